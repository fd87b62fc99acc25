"""FP8 quantization with NVIDIA ModelOpt (the `quantize` stage; see design.md)."""
