"""Quantization: pure primitives (primitives.py), methods in one registry (registry.py), model surgery apart. Every
file under quant/ that registers a method (a line `@method` above its class) is imported here, so a new method is
found by its file alone."""
import importlib as _importlib
import re as _re
from pathlib import Path as _Path

from quant.registry import METHODS, QuantContext, QuantOutcome  # noqa: F401

_ROOT = _Path(__file__).parent
_REGISTERS = _re.compile(r"^@method\s*$", _re.M)
for _path in sorted(_ROOT.rglob("*.py")):
    if "__pycache__" not in _path.parts and _REGISTERS.search(_path.read_text()):
        _importlib.import_module(".".join(("quant", *_path.relative_to(_ROOT).with_suffix("").parts)))
