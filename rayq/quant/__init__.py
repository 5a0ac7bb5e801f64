"""Quantization numerics: pure functions of tensors, free of Ray and I/O."""
