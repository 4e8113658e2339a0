"""FP8 weights: the FP8 linear and its quantization (`linear`), the FP8 cache on the volume
(`cache`), and Q/K/V packed into one FP8 matmul (`packed`)."""
