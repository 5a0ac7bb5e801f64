"""Where models and calibration data come from: Hugging Face folders, factories, packages, files."""
