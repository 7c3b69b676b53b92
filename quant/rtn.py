"""Round-to-nearest weight-only quantization: the baseline every method is compared against. Block by block, on the
placement's compute device (quant.onload), so a model larger than the GPU quantizes there too."""
from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from harness.architectures import architecture_for, get_blocks
from harness.config import WeightQuantConfig, quant_config
from harness.storage_bytes import packed_weight_bytes
from quant.registry import QuantContext, QuantOutcome, method
from quant.surgery import plan_layers, quantize_linear_


@quant_config("rtn")
@dataclass
class RTNConfig(WeightQuantConfig):
    """RTN has no knobs of its own: bits, grouping, zero point and per-layer overrides (WeightQuantConfig)."""

    method: str = "rtn"


@method("rtn", needs_calibration=False)
def rtn(model, cfg: RTNConfig, ctx: QuantContext) -> QuantOutcome:
    t0 = time.perf_counter()
    plan = plan_layers(model, cfg)  # bad group size or override: fails here, naming the layer
    arch, place = architecture_for(model), ctx.placement
    qtensors = {}
    for i, block in enumerate(tqdm(get_blocks(model, arch), desc="rtn", disable=not ctx.progress, leave=False)):
        done = {}
        with place.block(block):
            for rel in arch.linears:
                name = f"{arch.blocks}.{i}.{rel}"
                spec = plan.specs[name]
                if not spec.skip:
                    done[name] = quantize_linear_(block.get_submodule(rel), spec.w_bit, spec.group_size, spec.zero_point)
        place.to_host(done)
        qtensors.update(done)
    summary = {"method": "rtn", "w_bit": cfg.w_bit, "group_size": cfg.group_size, "zero_point": cfg.zero_point,
               "layers_quantized": len(qtensors), "group_fallback_layers": plan.fallbacks, **plan.summary(),
               "placement": {"compute": str(place.compute), "offload": place.offload},
               **packed_weight_bytes(model, qtensors)}
    return QuantOutcome(summary=summary, timings_s={"rtn": time.perf_counter() - t0}, qtensors=qtensors)
