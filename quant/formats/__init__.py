"""Weight formats other than the integer grid of quant/primitives.py: pure functions over tensors (fp4.py: e2m1
values with NVFP4's or MXFP4's block scales)."""
