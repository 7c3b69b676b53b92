"""Quantization: pure primitives (primitives.py), methods in one registry (registry.py), model surgery apart."""
from quant.registry import METHODS, QuantContext, QuantOutcome  # noqa: F401
from quant import rtn  # noqa: E402,F401  (registers the method)
from quant.awq import method as _awq  # noqa: E402,F401  (registers the method)
from quant.smoothquant import method as _smoothquant  # noqa: E402,F401  (registers the method)
from quant.gptq import method as _gptq  # noqa: E402,F401  (registers the method)
from quant.gptq import awq_gptq as _awq_gptq  # noqa: E402,F401  (registers the recipe)
from quant import recipe as _recipe  # noqa: E402,F401  (registers the list-of-steps method)
