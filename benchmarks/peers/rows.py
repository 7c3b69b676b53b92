"""What the peer benchmark runs: settings (columns), rows (harness presets by name, and peer recipes), the protocol
they share, and a peer worker's spec and command (the harness side of the hand-over described in
workers/common.py)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

WORKERS = Path(__file__).resolve().parent / "workers"
DATASETS_STUB = WORKERS / "stubs"  # put on the peers' path only where `datasets` does not import


@dataclass(frozen=True)
class Setting:
    """A weight setting every row is run at: int w_bit group g asymmetric, or a 4-bit float format."""

    name: str
    label: str
    format: str  # int | nvfp4
    w_bit: int
    group_size: int
    zero_point: bool

    def overrides(self) -> list[str]:
        """The harness's quant overrides for this setting (a preset the harness refuses at it is a row that does
        not apply, with the harness's own reason)."""
        out = [f"quant.group_size={self.group_size}", f"quant.zero_point={str(self.zero_point).lower()}"]
        return out + ([f"quant.w_bit={self.w_bit}"] if self.format == "int" else [f"quant.format={self.format}"])

    @property
    def levels(self) -> int:
        """The most distinct values a quantized group can hold (int: 2^bits; e2m1 has 15 values, ±0 equal)."""
        return 2**self.w_bit


SETTINGS = {s.name: s for s in (
    Setting("w4g64", "w4 g64", "int", 4, 64, True),
    Setting("w3g64", "w3 g64", "int", 3, 64, True),
    Setting("nvfp4", "NVFP4 (weights)", "nvfp4", 4, 16, False),
)}


@dataclass(frozen=True)
class PeerRow:
    name: str
    tool: str  # the package, as pip names it
    module: str  # what the worker imports (the preflight imports it)
    worker: str  # file under workers/
    recipe: str
    label: str


PEERS = {p.name: p for p in (
    PeerRow("llmc_rtn", "llmcompressor", "llmcompressor", "llmcompressor_worker.py", "rtn", "RTN"),
    PeerRow("llmc_gptq", "llmcompressor", "llmcompressor", "llmcompressor_worker.py", "gptq", "GPTQ"),
    PeerRow("llmc_awq", "llmcompressor", "llmcompressor", "llmcompressor_worker.py", "awq", "AWQ"),
    PeerRow("llmc_awq_gptq", "llmcompressor", "llmcompressor", "llmcompressor_worker.py", "awq_gptq", "AWQ→GPTQ"),
    PeerRow("autoround_pkg", "auto-round", "auto_round", "autoround_worker.py", "signround", "AutoRound (SignRound)"),
)}
# harness rows: conf/quant presets by name (any preset can be added by name with --rows, e.g. a rotation preset)
HARNESS_ROWS = ("rtn_w4", "gptq_w4", "gptq_w4_mse", "recipe_awq_duo_gptq_mse_w4", "rotation_gptq_mse_w4",
                "autoround_w4")
DEFAULT_ROWS = HARNESS_ROWS + tuple(PEERS)


@dataclass(frozen=True)
class Protocol:
    """What every row shares: calibration (n_samples x seqlen tokens of shakespeare_calib, seed 0, the harness's
    sampling), evaluation (windows x 512 tokens of eval_split), AutoRound's steps per block, dtype and device."""

    n_samples: int = 128
    seqlen: int = 512
    eval_split: str = "milton"
    eval_windows: int = 40
    iters: int = 200
    dtype: str = "bfloat16"  # the model every row is scored in (and the harness's methods quantize)
    # the model the peers quantize: float32 gives them full-precision numerics, as the harness's methods compute in
    # fp32 internally (llm-compressor fake-quantizes in the weights' dtype: in bf16 its scales are bf16 and x / scale
    # rounds before round(); a quarter of its bf16 RTN weights differ from fp32 RTN's); their weights are scored in
    # `dtype`
    peer_dtype: str = "float32"
    device: str = "cpu"
    awq_n_grid: int | None = None  # llm-compressor AWQ's scale grid; None: its default (20)
    quick: bool = False

    @classmethod
    def quick_run(cls, **kw) -> "Protocol":
        """The end-to-end check: every row on 2 cores (numbers not comparable to the full setting). llm-compressor's
        AWQ grid shrinks to 3 points, its smallest with duo scaling (its per-point overhead, not the tokens, sets its
        time here) and the peers run in bf16 (the CPU's fast dtype)."""
        return cls(**{"n_samples": 8, "seqlen": 128, "eval_windows": 4, "iters": 2, "awq_n_grid": 3,
                      "peer_dtype": "bfloat16", "quick": True, **kw})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def harness_overrides(preset: str, setting: Setting, protocol: Protocol, fields: set[str] = frozenset()) -> list[str]:
    """The compose overrides of a harness row at a setting; with `fields` (the preset's config fields), the
    protocol's calibration size where the method calibrates and its AutoRound steps where it has them, so the record
    states what the method was given."""
    out = [f"quant={preset}", *setting.overrides()]
    if "calib" in fields:
        out += [f"quant.calib.n_samples={protocol.n_samples}", f"quant.calib.seqlen={protocol.seqlen}"]
    return out + ([f"quant.iters={protocol.iters}"] if "iters" in fields else [])


def peer_spec(row: PeerRow, setting: Setting, protocol: Protocol, model_dir: str, tokens: Path, tokens_sha256: str,
              out_dir: Path) -> dict:
    """The JSON a worker reads (workers/common.py)."""
    return {"row": row.name, "tool": row.tool, "recipe": row.recipe, "setting": dataclasses.asdict(setting),
            "model_dir": str(model_dir), "dtype": protocol.peer_dtype, "device": protocol.device,
            "tokens": str(tokens), "tokens_sha256": tokens_sha256, "n_samples": protocol.n_samples,
            "seqlen": protocol.seqlen, "iters": protocol.iters, "awq_n_grid": protocol.awq_n_grid,
            "out_dir": str(out_dir)}


def worker_command(python: str, row: PeerRow, spec_path: Path) -> list[str]:
    return [python, str(WORKERS / row.worker), str(spec_path)]


def worker_env(pythonpath: list[str], stub_datasets: bool) -> dict:
    """The worker's environment: the peers' extra path (wheels installed with --target on the GPU machine), the
    `datasets` stub where that package is missing, and every hub offline (the peers must download nothing)."""
    path = [*pythonpath, *([str(DATASETS_STUB)] if stub_datasets else [])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}
