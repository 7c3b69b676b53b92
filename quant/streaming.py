"""Quantizing a model whose weights never all sit in host memory (issue 26): blocks streamed from the checkpoint.

The model is built without weights (every parameter on the meta device: shapes and dtypes, no bytes); the parts
outside the decoder blocks (embeddings, final norm, LM head; rotary tables are computed, not read) are loaded into
host memory; each decoder block's tensors are read only for its turn in the calibration runner
(quant.calibration.runner asks the placement for the block, `StreamingPlacement.block`), and when its codes have been
taken the quantized Linears' weights are released (back to the meta device). What stays is the block's small
unquantized tensors (norms, biases, a router: AWQ folds its scales into the norms, and the export needs them) and the
codes: in host memory (`QTensor`s as the in-memory path gives them: uint8 codes, 0.5x the fp16 weights at 4 bits), or
written straight to an AWQ GEMM checkpoint block by block (`sink`, quant.export.awq_shards: packed int4, none of it
kept; the QTensors become shells on the meta device that keep their shapes for the summary's bytes).

Where a block's tensors come from (`BlockSource`):
  - `SafetensorsBlocks`: a checkpoint's safetensors files, opened memory-mapped (safetensors.safe_open) for one block's
    turn and closed after it, so the mapped pages leave the process's resident set with the block;
  - `SyntheticBlocks`: random weights at a real shape, generated block by block from the seed on the compute device
    (harness.synthetic.block_tensors, equal to the file harness.synthetic writes on that device), so shapes larger than
    the disk are timed.

Only methods that pass over the blocks once, in order, and keep no weights outside their block turn stream
(`Method.streams`: RTN, AWQ, GPTQ); a second pass over a block (a recipe's later step, SmoothQuant's two passes) is
refused by name before any work (`check_streamable`), and the placement refuses to read a block twice as a backstop.
Nothing evaluates the model afterwards (its blocks have no weights): streaming is for quantize-only runs and exports.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.nn as nn

from harness.architectures import ARCHITECTURES, architecture_for, get_blocks
from harness.config import ConfigError
from quant.onload import HOST, Placement, _transfer, qtensors_to_host

META = torch.device("meta")


class StreamingError(ConfigError):
    """Streaming cannot work for this method, model or checkpoint (said before any work where possible)."""


# ----------------------------------------------------------------------------------------------- sources


class BlockSource(Protocol):
    description: str  # the record's words for where the weights came from

    def block(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Decoder block `index`'s tensors by their full names (model.layers.<index>....), on `device` or the host."""
        ...

    def outside(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors outside the decoder blocks, by full name."""
        ...


class SafetensorsBlocks:
    """A Hugging Face checkpoint directory's safetensors (one file, or shards with model.safetensors.index.json), read
    by tensor name. Each call opens the files it needs memory-mapped and closes them before it returns: the copies it
    returns are the only bytes that stay."""

    def __init__(self, model_dir, blocks_prefix: str = "model.layers"):
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(d.glob("*.safetensors"))
            if not files:
                raise StreamingError(f"model.path: {d} has no .safetensors files; streaming reads blocks from "
                                     f"safetensors only (convert the checkpoint, or load it whole without streaming)")
            from safetensors import safe_open

            self.files = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    self.files.update({k: f for k in h.keys()})
        self.prefix = blocks_prefix + "."
        self.description = f"safetensors {d} (memory-mapped, one block at a time)"

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), "pt", device="cpu") as h:  # closing unmaps: no file page stays resident
                out.update({n: h.get_tensor(n) for n in ns})
        return out

    def block(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        p = f"{self.prefix}{index}."
        return self._read([n for n in self.files if n.startswith(p)])

    def outside(self, device: torch.device) -> dict[str, torch.Tensor]:
        return self._read([n for n in self.files if not n.startswith(self.prefix)])


class SyntheticBlocks:
    """Random weights at a synthetic architecture's shape (harness.synthetic), each block generated from (seed, tensor
    name) for its turn on the device it computes on: no file, no host copy."""

    def __init__(self, arch, seed: int = 0):
        from harness import synthetic

        self.arch, self.seed = arch, seed
        self.description = (f"synthetic {arch.name}, seed {seed}, generated block by block "
                            f"({synthetic.GENERATOR}; no file)")

    def block(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        from harness.synthetic import block_tensors

        return block_tensors(self.arch, index, device=str(device), seed=self.seed)

    def outside(self, device: torch.device) -> dict[str, torch.Tensor]:
        from harness.synthetic import outside_tensors

        return outside_tensors(self.arch, device=str(device), seed=self.seed)


# ----------------------------------------------------------------------------------------------- the model skeleton


@contextmanager
def _parameters_on_meta():
    """Every parameter created meanwhile lives on the meta device (shape and dtype, no memory); buffers stay real,
    so computed ones (rotary inv_freq) are right. (accelerate's init_empty_weights(include_buffers=False).)"""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to(META), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(hf_config, dtype: torch.dtype) -> nn.Module:
    """The model of `hf_config` in `dtype`, its parameters on the meta device (no weight memory, no initialisation)."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    from harness.moe_unfuse import unfuse_experts

    try:  # skips initialising weights (on meta tensors it would cost nothing anyway)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = nullcontext
    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    unfuse_experts(model)  # the layout the in-memory path quantizes (per-expert Linears)
    return model.eval()


def _put(module: nn.Module, name: str, t: torch.Tensor) -> None:
    """Parameter `name` of `module` (relative, dotted) becomes `t` (a new Parameter: a meta one cannot take data)."""
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    old = mod._parameters[leaf]
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad if old is not None else False)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
        if bool((~torch.isfinite(t)).any()):
            raise FloatingPointError(f"checkpoint tensor {name} holds NaN/Inf values; weights must be finite")


def _own(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`t` on `device` in `dtype`, in memory of its own: a tensor read from a memory-mapped file may share the mapping
    (copy-on-write), and a method writing the weights in place would turn the mapped file pages into private ones that
    stay with the mapping (measured: one block's bytes per block)."""
    out = t.to(device=device, dtype=dtype)
    return out.clone() if out.device.type == "cpu" and out.data_ptr() == t.data_ptr() else out


NAMED_OTHERWISE = ("streaming reads tensors by the model's own names, and this checkpoint names them otherwise (a "
                   "layout transformers converts at load): load it without streaming")


def _load(module: nn.Module, name: str, p: torch.Tensor, t: torch.Tensor, device: torch.device, full: str) -> None:
    """Parameter `name` of `module` (the meta `p`) from the checkpoint tensor `t` (`full`: its checkpoint name)."""
    if tuple(t.shape) != tuple(p.shape):
        raise StreamingError(f"checkpoint tensor {full} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
    t = _own(t, device, p.dtype)
    _check_finite(full, t)
    _put(module, name, t)


def _fill(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Every meta parameter of `module` (full names `prefix` + its own) from `tensors`, in its own dtype on `device`;
    a parameter the source lacks fails, naming it."""
    wanted = {n: p for n, p in module.named_parameters() if p.device.type == "meta"}
    missing = [prefix + n for n in wanted if prefix + n not in tensors]
    if missing:
        raise StreamingError(f"the checkpoint has no tensor {missing[0]} (and {len(missing) - 1} more); "
                             f"{NAMED_OTHERWISE}")
    for n, p in wanted.items():
        _load(module, n, p, tensors.pop(prefix + n), device, prefix + n)  # each read copy goes once it is cast


def load_outside(model: nn.Module, source: BlockSource) -> None:
    """The parameters outside the decoder blocks, in host memory (a tied LM head tied again to the embeddings)."""
    arch = architecture_for(model)
    inside = {id(p) for p in get_blocks(model, arch).parameters()}
    tensors = source.outside(HOST)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if id(p) in inside or p.device.type != "meta" or (tied and name == f"{arch.lm_head}.weight"):
            continue
        if name not in tensors:
            raise StreamingError(f"the checkpoint has no tensor {name}; {NAMED_OTHERWISE}")
        _load(model, name, p, tensors[name], HOST, name)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in inside]
    if left:
        raise StreamingError(f"the checkpoint leaves {left[0]} without weights")


def streamed_model(hf_config, dtype: torch.dtype, source: BlockSource) -> nn.Module:
    """The model for a streamed quantization: skeleton, the parts outside the blocks loaded, no block weights."""
    if getattr(hf_config, "model_type", None) not in ARCHITECTURES:
        ARCHITECTURES.get(getattr(hf_config, "model_type", None))  # fails naming the registry
    model = skeleton(hf_config, dtype)
    load_outside(model, source)
    return model


# ----------------------------------------------------------------------------------------------- the placement


@dataclass(frozen=True)
class StreamingPlacement(Placement):
    """Placement (quant.onload) whose blocks are read from `source` for their turn and released after it. `sink`:
    where a finished block's codes go (an object with `write_block(index, prefix, qtensors)` and optionally
    `bind(model)`, e.g. quant.export.awq_shards.AWQShardWriter), None: host memory."""

    source: Any = None
    model: Any = field(default=None, compare=False, repr=False)
    sink: Any = field(default=None, compare=False, repr=False)
    state: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, device, model: nn.Module, source: BlockSource, sink=None) -> "StreamingPlacement":
        d = torch.device(device)
        arch = architecture_for(model)
        index = {id(b): i for i, b in enumerate(get_blocks(model, arch))}
        if sink is not None and hasattr(sink, "bind"):
            sink.bind(model)  # a checkpoint writer names the tensors after the model's architecture
        return cls(d, True, source, model, sink, {"index": index, "prefix": arch.blocks, "done": set(),
                                                  "read_bytes": 0, "read_s": 0.0, "current": None})

    def check(self, method, cfg, ctx) -> None:
        check_streamable(method, cfg, checkpoint_dir=ctx.checkpoint_dir)

    def describe(self) -> dict:
        return {"compute": str(self.compute), "offload": True, "stream": self.source.description,
                "codes": "export" if self.sink is not None else "host", "blocks_read": len(self.state["done"]),
                "block_read_bytes": self.state["read_bytes"], "block_read_s": round(self.state["read_s"], 3)}

    @contextmanager
    def block(self, block: nn.Module):
        """`block` with its weights read from the source onto the compute device; afterwards its quantized Linears'
        weights released (meta) and its other tensors in host memory."""
        import time

        st = self.state
        i = st["index"].get(id(block))
        if i is None:
            raise StreamingError("streaming: a block that is not one of the model's decoder blocks was asked for")
        if i in st["done"]:
            raise StreamingError(f"streaming: block {i} was asked for a second time; a streamed quantization reads "
                                 f"each block once (a method that passes over the blocks again cannot stream)")
        t = time.perf_counter()
        tensors = self._read(i)
        st["read_bytes"] += sum(v.numel() * v.element_size() for v in tensors.values())
        _fill(block, f"{st['prefix']}.{i}.", tensors, self.compute)
        del tensors
        st["read_s"] += time.perf_counter() - t
        st["current"], st["taken"], st["shells"] = i, set(), []
        try:
            yield block
        finally:
            for qtensors in st["shells"]:
                _shell(qtensors)
            self._release(block, st["taken"])
            st["done"].add(i)
            st["current"], st["taken"], st["shells"] = None, set(), []

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors on the compute device. A block read into host memory on an accelerator travels through
        one of two pinned staging buffers (by the block's parity), staged by a reader thread one block ahead, so the
        next block's read (page faults and a copy out of the memory-mapped file) overlaps this block's compute; then
        one DMA per tensor."""
        if self.compute.type == "cpu":
            return self.source.block(i, self.compute)
        st = self.state
        ahead, staged = st.pop("ahead", None), None
        if ahead is not None:
            got = ahead[1].result()  # (also when not block i: its buffer must be free before it is staged again)
            staged = got if ahead[0] == i else None
        tensors, host = staged if staged is not None else self._stage(i)
        if host:
            tensors.update(zip(host, self._transfers()[i % 2].upload(list(host.values()))))
            if i + 1 < len(st["index"]):
                if "reader" not in st:
                    from concurrent.futures import ThreadPoolExecutor

                    st["reader"] = ThreadPoolExecutor(1, thread_name_prefix="block-reader")
                st["ahead"] = (i + 1, st["reader"].submit(self._stage, i + 1))
        return tensors

    def _stage(self, i: int) -> tuple[dict, dict]:
        """(block i's tensors the source made on the device, {name: view of the staging buffer of i's parity} for
        those it read into host memory)."""
        tensors = self.source.block(i, self.compute)
        host = [n for n, v in tensors.items() if v.device.type == "cpu"]
        if not host:
            return tensors, {}
        views = self._transfers()[i % 2].stage([tensors.pop(n) for n in host])
        return tensors, dict(zip(host, views))

    def _transfers(self) -> list:
        if "transfers" not in self.state:
            from quant.onload import Transfer

            self.state["transfers"] = [Transfer(self.compute), Transfer(self.compute)]
        return self.state["transfers"]

    def _release(self, block: nn.Module, taken: set[str]) -> None:
        for name, p in list(block.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            if owner in taken and leaf == "weight":
                _put(block, name, torch.empty(p.shape, dtype=p.dtype, device=META))
            elif p.device != HOST:
                _put(block, name, p.data.to(HOST))
        for mod in block.modules():
            for name, b in mod._buffers.items():
                if b is not None and b.device != HOST:
                    mod._buffers[name] = b.to(HOST)
        _trim_host_heap()


    def to_host(self, qtensors: dict) -> None:
        """A finished block's codes: to the sink (then shells at the block's end) or into host memory; their Linears'
        weights are released with the block."""
        st = self.state
        st["taken"] |= set(qtensors)
        if self.sink is not None and st["current"] is not None:
            self.sink.write_block(st["current"], f"{st['prefix']}.{st['current']}", qtensors)
            st["shells"].append(qtensors)
        else:
            qtensors_to_host(qtensors, _transfer(self.compute) if self.compute.type == "cuda" else None)


def _trim_host_heap() -> None:
    """Give the freed block's host memory back to the system. glibc's malloc keeps freed chunks below its mmap
    threshold (up to 32 MiB) in the heap, where the next block's differently sized tensors fragment it: measured on a
    12-block model with 4-16 MB tensors, the resident set grew by about one block per block without this, and by only
    the codes with it. malloc_trim(0) costs milliseconds; elsewhere than glibc it is skipped."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (present in glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _shell(qtensors: dict) -> None:
    """QTensors whose codes went to the export: meta tensors of the same shapes (their bytes are in the checkpoint;
    reading their values fails loudly)."""
    for qt in qtensors.values():
        for f in ("q", "scales", "zeros"):
            v = getattr(qt, f)
            if v is not None:
                setattr(qt, f, torch.empty(v.shape, dtype=v.dtype, device=META))


# ----------------------------------------------------------------------------------------------- refusals


def check_streamable(method, cfg, *, evaluates=(), checkpoint_dir=None) -> None:
    """Before any work: streaming works for this method (`Method.streams`) and this run (nothing evaluates the model
    afterwards: `evaluates` names the evaluators that would; no block checkpoints to resume from)."""
    from quant import METHODS

    if not getattr(method, "streams", False):
        ok = ", ".join(n for n in METHODS if getattr(METHODS.get(n), "streams", False))
        raise StreamingError(f"quant.method: {cfg.method} — streaming reads each block once and keeps no block "
                             f"weights, and {cfg.method} needs the model again after a block's turn (more than one "
                             f"pass, or whole-model state) — methods that stream: {ok}")
    if getattr(cfg, "round_weights", True) is False:
        raise StreamingError(f"quant.round_weights=false: {cfg.method} would leave every block's weights changed but "
                             f"not rounded, and streaming keeps no block weights, only codes: stream a rounding run")
    if evaluates:
        raise StreamingError(f"model.stream=true: streaming leaves the decoder blocks without weights after "
                             f"quantization, so no evaluator can run (enabled: {', '.join(evaluates)}) — use eval=none "
                             f"(quantize and export only), or load the model whole (model.stream=false)")
    if checkpoint_dir is not None:
        raise StreamingError("streaming keeps no per-block checkpoints to resume from (its codes go to host memory "
                             "or straight to the export): run without checkpoint_dir")


def synthetic_config(arch) -> Any:
    """The transformers config of a synthetic architecture (harness.synthetic.Arch), without any file."""
    from transformers import AutoConfig

    if arch.remote_code:
        raise StreamingError(f"synthetic {arch.name}: its model is remote code; on-the-fly synthetic weights need an "
                             f"architecture transformers builds itself (write the checkpoint and stream from it)")
    c = dict(arch.hf_config)
    c.pop("architectures", None)
    c.pop("torch_dtype", None)
    return AutoConfig.for_model(c.pop("model_type"), **c)


def open_streamed(*, device, dtype: torch.dtype = torch.float16, model_dir: Optional[Path] = None,
                  synthetic_arch=None, seed: int = 0, sink=None) -> tuple[nn.Module, StreamingPlacement]:
    """The model skeleton with its outside parts and the placement that streams its blocks: from a checkpoint
    directory (`model_dir`), or from a synthetic architecture's seed (`synthetic_arch`, no file)."""
    if (model_dir is None) == (synthetic_arch is None):
        raise ValueError("open_streamed: give model_dir or synthetic_arch")
    if model_dir is not None:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(model_dir))
        prefix = ARCHITECTURES.get(hf_config.model_type).blocks
        source = SafetensorsBlocks(model_dir, prefix)
    else:
        hf_config = synthetic_config(synthetic_arch)
        source = SyntheticBlocks(synthetic_arch, seed)
    model = streamed_model(hf_config, dtype, source)
    return model, StreamingPlacement.of(device, model, source, sink)
