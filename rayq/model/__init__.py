"""Model structure: which layers are quantizable, BatchNorm folding, the compressed module."""
