"""Resume inside a long quantization (#15): after each finished decoder block, the block's state (every parameter
and buffer, e.g. norms that absorbed AWQ scales) and its integer codes go to block_<i>.safetensors with a JSON
sidecar written last, each through a temp file and a rename; no pickle. The sidecar records the sha256 of the tensor
file's bytes (harness.integrity), and a block is reused only when its bytes still have it: a damaged or edited block is
named in one line and computed again from there (issue 27). A killed run finds the leading blocks finished, loads
them and goes on from the next one. The directory is named by the quantized cache's key (model, method config,
calibration identity, code version) and deleted once the whole result is in that cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError

from harness.assets import atomic_file
from harness.integrity import load_tensors, save_tensors
from harness.log import logger
from quant.primitives import QTensor

FORMAT = 1
warn = logger("checkpoint")


class BlockCheckpoints:
    """`identity`: what must match for a block to be reused beyond the directory's key (the calibration samples'
    hash, the number of blocks), checked on every read."""

    def __init__(self, directory: Path, identity: dict):
        self.dir, self.identity = Path(directory), {"format": FORMAT, **identity}

    def _paths(self, i: int) -> tuple[Path, Path]:
        return self.dir / f"block_{i:04d}.safetensors", self.dir / f"block_{i:04d}.json"

    def save(self, i: int, block: nn.Module, qtensors: dict[str, QTensor], info: dict, seconds: float) -> None:
        """Block i, finished: its state, the codes of its Linears (names relative to the block), the method's info."""
        tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        for n, q in qtensors.items():
            tensors[f"codes.{n}"], tensors[f"scales.{n}"] = q.q.cpu().contiguous(), q.scales.cpu().contiguous()
            if q.zeros is not None:
                tensors[f"zeros.{n}"] = q.zeros.cpu().contiguous()
        tensors_path, sidecar = self._paths(i)
        meta = {**self.identity, "block": i, "info": info, "seconds": seconds,
                "qtensors": {n: {"w_bit": q.w_bit, "group_size": q.group_size} for n, q in qtensors.items()},
                "sha256": save_tensors(tensors, tensors_path)}
        with atomic_file(sidecar) as tmp:  # last: a sidecar names tensors that are all there
            tmp.write_text(json.dumps(meta, indent=1))

    def _read(self, i: int) -> tuple[dict, dict] | None:
        tensors_path, sidecar = self._paths(i)
        if not (tensors_path.exists() and sidecar.exists()):
            return None
        try:
            meta = json.loads(sidecar.read_text())
            if {k: meta.get(k) for k in self.identity} != self.identity or meta.get("block") != i:
                warn(f"{sidecar} is from another calibration; quantizing again from block {i}")
                return None
            return meta, load_tensors(tensors_path, meta.get("sha256"))
        except (OSError, ValueError, SafetensorError) as e:  # IntegrityError is a ValueError
            warn(f"{tensors_path} is not a usable checkpoint ({type(e).__name__}: {str(e)[:160]}); discarding it "
                 f"and quantizing again from block {i}")
            return None

    def finished(self, n_blocks: int) -> int:
        """How many leading blocks are checkpointed (0 when none)."""
        k = 0
        while k < n_blocks and all(p.exists() for p in self._paths(k)):
            k += 1
        return k

    def load(self, i: int, block: nn.Module) -> tuple[dict[str, QTensor], dict, float] | None:
        """Block i's state into `block` (copied into its parameters, where they are), its codes, info and seconds; None when
        the checkpoint is missing or unusable (the block is then untouched)."""
        got = self._read(i)
        if got is None:
            return None
        meta, tensors = got
        state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        own = block.state_dict()
        if own.keys() != state.keys() or any(state[k].shape != v.shape or state[k].dtype != v.dtype
                                             for k, v in own.items()):
            warn(f"block {i} checkpoint does not fit the model; quantizing again from block {i}")
            return None
        block.load_state_dict(state, strict=True)  # checked first, so a misfit leaves the block as it was
        qtensors = {n: QTensor(q=tensors[f"codes.{n}"], scales=tensors[f"scales.{n}"], zeros=tensors.get(f"zeros.{n}"),
                               w_bit=d["w_bit"], group_size=d["group_size"]) for n, d in meta["qtensors"].items()}
        return qtensors, meta["info"], meta["seconds"]

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
