"""The version of the code behind a run's numbers, and why an existing record cannot stand for its config now: one
implementation, used by the pipeline (reuse a record or recompute it: experiments.pipeline) and by the report (mark a
row made by other code: report.record_view.code_change). It lives here, the lowest layer that knows both the methods'
sources (quant.registry.method_sources) and the evaluators' (eval.registry.evaluator_sources); the hashing is
harness.environment.code_version."""
from __future__ import annotations

from pathlib import Path

from harness.config import RunConfig
from harness.environment import changed_parts, code_version, machine_name
from harness.models import resolve_model
from eval.registry import evaluator_sources, ordered_names
from quant.registry import method_sources

# sources behind every run's numbers, beside the method's (derived from its imports: quant.sources) and each enabled
# evaluator's (eval.registry.EVALUATOR_SOURCES)
RUN_SOURCES = ["harness/data.py", "harness/corpus.py", "eval/forward.py"]


def code_version_of(cfg: RunConfig) -> dict:
    """The version of the code that determines `cfg`'s numbers, part by part (harness.environment.code_version)."""
    parts = {"data": RUN_SOURCES, f"quant.{cfg.quant.method}": method_sources(cfg.quant),
             f"backends.{cfg.backend.name}": [f"backends/{cfg.backend.name}.py"]}
    if cfg.kv.bits != 16:
        parts["quant.kv_cache"] = ["quant/kv_cache.py"]
    for name in ordered_names():
        section = getattr(cfg.eval, name, None)
        if section is None or getattr(section, "enabled", True):
            parts[f"eval.{name}"] = evaluator_sources(name)
    return code_version(parts)


def local_model_sha(cfg: RunConfig) -> str | None:
    """The weights' identity of a model given by a local path (a checkpoint directory or a .gguf file), or None for
    the embedded models (checked against their conversion), synthetic ones and hub ids. Cheap: each file's sha256 is
    remembered by its stamp (harness.assets.file_sha256), hashed again only after an edit."""
    path = cfg.model.path
    p = Path(path).expanduser()
    if path.startswith(("embedded:", "synthetic:")) or not ((p.is_dir() and (p / "config.json").exists()) or
                                                             (p.is_file() and path.endswith(".gguf"))):
        return None
    return resolve_model(cfg.model).model_sha


def code_change(rec: dict, cfg: RunConfig) -> str | None:
    """Why `rec` was not made by the code that computes `cfg` now ("made by other code (quant.awq changed)", naming
    the parts whose sources differ), or None when the code is the same."""
    old = rec.get("code_version")
    if not old:
        return "made before records carried a code_version"
    now = code_version_of(cfg)
    if old.get("hash") != now["hash"]:
        return f"made by other code ({', '.join(changed_parts(old, now))} changed)"
    return None


def stale_reason(rec: dict, cfg: RunConfig) -> str | None:
    """Why an existing complete record cannot stand for `cfg` now, or None: other code made it (code_change), other
    weights at the same local model.path (its run_id names the path, not the bytes), or (for a record with
    throughput) another machine measured it."""
    why = code_change(rec, cfg)
    if why:
        return why
    sha, then = local_model_sha(cfg), (rec.get("provenance") or {}).get("model_sha")
    if sha is not None and sha != then:
        return f"made from other weights at {cfg.model.path} (model_sha {then} then, {sha} now)"
    if (rec.get("metrics") or {}).get("throughput") is not None:
        here, there = machine_name(), (rec.get("provenance") or {}).get("machine")
        if there != here:
            return f"throughput measured on another machine ({there}; this is {here})"
    return None
