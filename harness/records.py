"""One self-describing JSON record per run: resolved config, metrics, provenance. Written atomically, keyed by a
stable hash of what determines the result."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

from harness.assets import atomic_file
from harness.config import NON_IDENTITY_FIELDS, RunConfig
from harness.environment import git_sha, hardware, package_versions
from harness.text_files import is_file_source

RECORD_VERSION = 1


def identity(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in NON_IDENTITY_FIELDS:
        d.pop(k, None)
    _file_sources_by_content(d)
    return d


def _file_sources_by_content(d: dict) -> None:
    """Local text files (`file:<path>`) enter the identity by their content's hash, not their path; every other
    source name is kept as it is (so configs without files keep their run_ids)."""
    calib = d.get("quant", {}).get("calib", {})
    names = list(d.get("data", {}).get("splits", [])) + [calib.get("dataset")]
    if not any(is_file_source(n) for n in names):
        return
    from harness.data import source_identity  # torch and the tokenizer cache: only when a file is named

    d["data"]["splits"] = [source_identity(n) for n in d["data"]["splits"]]
    calib["dataset"] = source_identity(calib["dataset"])


def run_id(cfg: RunConfig) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_path(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / "runs" / f"{run_id(cfg)}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Temp file in the same folder + rename (harness.assets.atomic_file): a reader, or a sweep deciding whether a
    run is done, sees the old file or the new one, never half of one."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))


def load_record(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_records(results_dir: str | Path) -> list[dict]:
    runs = Path(results_dir) / "runs"
    return [load_record(p) for p in sorted(runs.glob("*.json"))] if runs.exists() else []


def provenance(extra: dict | None = None) -> dict:
    p = {"git_sha": git_sha(), "versions": package_versions(), "hardware": hardware(),
         "python": platform.python_version(), "created_unix": time.time(),
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if extra:
        p.update(extra)
    return p


def make_record(cfg: RunConfig, metrics: dict, prov: dict, timings_s: dict, status: str = "complete") -> dict:
    return {
        "record_version": RECORD_VERSION,
        "run_id": run_id(cfg),
        "status": status,
        "config": dataclasses.asdict(cfg),
        "metrics": metrics,
        "timings_s": timings_s,
        "provenance": prov,
    }
