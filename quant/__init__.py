"""Quantization: pure primitives (primitives.py), methods in one registry (registry.py), model surgery apart."""
from quant.registry import METHODS, QuantContext, QuantOutcome  # noqa: F401
