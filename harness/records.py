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
from harness.config import LATE_FIELDS, NON_IDENTITY_FIELDS, RunConfig
from harness.environment import git_sha, hardware, machine_name, package_versions

RECORD_VERSION = 1


def identity(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in NON_IDENTITY_FIELDS:
        d.pop(k, None)
    for (section, k), default in LATE_FIELDS.items():
        if d.get(section, {}).get(k, default) == default:
            d[section].pop(k, None)
    return d


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
    hw = hardware()
    p = {"git_sha": git_sha(), "versions": package_versions(), "hardware": hw, "machine": machine_name(hw),
         "python": platform.python_version(), "created_unix": time.time(),
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if extra:
        p.update(extra)
    return p


def make_record(cfg: RunConfig, metrics: dict, prov: dict, timings_s: dict, status: str = "complete",
                code_version: dict | None = None) -> dict:
    """`code_version`: harness.environment.code_version of the sources that determine the numbers; a record is
    reused only while it matches (experiments.pipeline.stale_reason)."""
    return {
        "record_version": RECORD_VERSION,
        "run_id": run_id(cfg),
        "status": status,
        "code_version": code_version,
        "config": dataclasses.asdict(cfg),
        "metrics": metrics,
        "timings_s": timings_s,
        "provenance": prov,
    }
