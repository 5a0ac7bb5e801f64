"""Calibration passes: activation statistics and quantization sensitivity (QS) sums."""
