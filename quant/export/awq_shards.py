"""An AWQ GEMM checkpoint written block by block while a streamed quantization runs (quant.streaming): each finished
block's codes are packed (on the device they were computed on) and written to a shard of their own, then dropped, so
no model-sized set of codes is ever held; `finish` writes the tensors outside the quantized Linears (embeddings,
norms with AWQ's folded scales, LM head, skipped Linears) from the model, the config with AutoAWQ's
quantization_config, quant_meta.json and the shard index. The layout and the tensors are those of
quant.export.awq.export_awq, split over shards as save_pretrained does (model.safetensors.index.json); the folder
appears at `out_dir` only when `finish` succeeds (harness.assets.atomic_directory)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quant.export.awq import (AWQ_BITS, META_FILE, AWQExportError, _plain_tensors, _quantization_config,
                              check_awq_gemm, qtensor_to_awq, unquantized_linears)
from quant.export.names import CheckpointNames

INDEX = "model.safetensors.index.json"


class AWQShardWriter:
    def __init__(self, out_dir):
        from harness.assets import atomic_directory

        self.out_dir = Path(out_dir)
        self._atomic = atomic_directory(self.out_dir)
        self.tmp = self._atomic.__enter__()
        self.weight_map: dict[str, str] = {}
        self.packed_bytes = 0
        self.shards: list[str] = []
        self.names = None  # the architecture's checkpoint names (quant/export/names.py), once bound to the model

    def bind(self, model) -> None:
        """The model (a skeleton will do) whose architecture names the tensors: an MoE's experts are written under
        the names its checkpoints use, as export_awq writes them (quant.streaming binds it before the first block)."""
        self.names = CheckpointNames(model)

    def _module(self, name: str) -> str:
        return self.names.module(name) if self.names is not None else name

    def write_block(self, index: int, prefix: str, qtensors: dict) -> None:
        """Block `index`'s codes (QTensors by name relative to `prefix`, on any device) into their own shard."""
        from safetensors.torch import save_file

        tensors = {}
        for rel, qt in qtensors.items():
            check_awq_gemm(qt, f"{prefix}.{rel}")
            self.packed_bytes += qt.nbytes_packed()
            for suffix, t in qtensor_to_awq(qt).items():  # packed where the codes are (a GPU packs in microseconds)
                tensors[f"{self._module(f'{prefix}.{rel}')}.{suffix}"] = t
        # one transfer per tensor of the packed int4 (a quarter of the fp16 weight), then written and dropped
        tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
        name = f"model-block-{index:05d}.safetensors"
        save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        self.shards.append(name)
        self.weight_map.update({k: name for k in tensors})

    def finish(self, model, qtensors: dict, tokenizer=None, quant_meta: dict | None = None,
               manifest: dict | None = None) -> Path:
        """Everything but the block shards, then the folder in place; `qtensors`: every quantized Linear by qualified
        name (shells or real: only their names, shapes and group sizes are read). With `manifest`,
        harness.outputs.MANIFEST is written last, naming every file (as export_awq does)."""
        from safetensors.torch import save_file
        from torch import nn

        try:
            if self.names is None:
                self.bind(model)
            names = self.names
            missing = [n for n in qtensors if f"{names.module(n)}.qweight" not in self.weight_map]
            if missing:
                raise AWQExportError(f"{missing[0]} (and {len(missing) - 1} more) never reached the shards")
            modules = dict(model.named_modules())
            out_emb = model.get_output_embeddings()
            rest = {names(k): t for k, t in _plain_tensors(model, qtensors).items()}
            meta_left = [k for k, v in rest.items() if v.device.type == "meta"]
            if meta_left:
                raise AWQExportError(f"{meta_left[0]}: no weights in the model (a block that never finished?)")
            save_file(rest, str(self.tmp / "model-rest.safetensors"), metadata={"format": "pt"})
            self.weight_map.update({k: "model-rest.safetensors" for k in rest})
            total = sum((self.tmp / f).stat().st_size for f in set(self.weight_map.values()))
            (self.tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(self.weight_map.items()))}, indent=1))
            skipped = sorted(names.module(n) for n in unquantized_linears(model, qtensors)
                             if modules.get(n) is not out_emb)
            config = model.config.to_dict()
            config["quantization_config"] = _quantization_config(qtensors, skipped)
            config["dtype"] = "float16"
            config.pop("torch_dtype", None)
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            any_qt = next(iter(qtensors.values()))
            meta = {"format": "awq-gemm", "w_bit": AWQ_BITS, "group_size": any_qt.group_size, "zero_point": True,
                    "n_quantized_linears": len(qtensors), "quantized_packed_bytes": self.packed_bytes,
                    "written": "block by block (quant.streaming)", "shards": len(self.shards) + 1,
                    "lmdeploy_engines": ["pytorch", "turbomind"] if any_qt.group_size == 128 else ["pytorch"],
                    "file_bytes": total, **(quant_meta or {})}
            (self.tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
            if manifest is not None:
                from harness.outputs import write_manifest

                write_manifest(self.tmp, manifest)
        except BaseException as e:
            self.abort(e)
            raise
        self._atomic.__exit__(None, None, None)
        return self.out_dir

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the partial folder (out_dir is left as it was)."""
        try:
            self._atomic.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)
        except BaseException:
            pass
