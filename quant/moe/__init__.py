"""Mixtures of experts: calibration coverage of routed experts (coverage.py). The layer maps are in
harness.architectures, the per-expert Linears in harness.moe_unfuse, the upcycled test model in harness.moe_upcycle."""
