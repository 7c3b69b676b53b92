"""One self-describing JSON record per run: resolved config, metrics, provenance. Written atomically, keyed by a
stable hash of what determines the result."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

from harness.assets import atomic_file, probe_write, remove_stale_tmp
from harness.config import (LATE_FIELDS, NON_IDENTITY_FIELDS, QuantConfig, RunConfig, quant_identity_dict, user_error,
                            without_late_defaults)
from harness.environment import git_state, hardware, machine_name, package_versions
from harness.log import logger
from harness.record_schema import RECORD_VERSION  # the schema owns the version it reads
from harness.text_files import is_file_source

MIN_FREE_BYTES = 1 << 20  # room for a record (tens of kB) with a wide margin
warn = logger("records")


class CorruptRecordError(ValueError):
    """A file under runs/ that is not a whole JSON record (e.g. truncated by a full disk); the message names it."""


def quant_identity(q: QuantConfig) -> dict:
    """The part of a run's identity (and of the quantized-weight cache key) that the quant config gives: the chosen
    method's fields only, its late fields left out at their default, fp16/rtn/awq in their compatibility view
    (harness.config.quant_identity_dict, LEGACY_QUANT_VIEW). Adding a method or a field renames no record."""
    return quant_identity_dict(dataclasses.asdict(q), type(q))


def identity(cfg: RunConfig) -> dict:
    """What determines a run's result, hashed into its run_id: the whole config less NON_IDENTITY_FIELDS, the late
    fields at their default (LATE_FIELDS; a method's own `late_fields`), the quant section as quant_identity gives
    it, and local text files by their content."""
    d = dataclasses.asdict(cfg)
    for k in NON_IDENTITY_FIELDS:
        d.pop(k, None)
    for section in {section for section, _ in LATE_FIELDS}:
        d[section] = without_late_defaults(section, d[section])
    d["quant"] = quant_identity(cfg.quant)
    _file_sources_by_content(d)
    return d


def _file_sources_by_content(d: dict) -> None:
    """Local text files (`file:<path>`) enter the identity by their content's hash, not their path; every other
    source name is kept as it is (so configs without files keep their run_ids)."""
    calib = d.get("quant", {}).get("calib") or {}  # only calibrated methods have one
    names = list(d.get("data", {}).get("splits", [])) + [calib.get("dataset")]
    if not any(is_file_source(n) for n in names if n is not None):
        return
    from harness.data import source_identity  # torch and the tokenizer cache: only when a file is named

    d["data"]["splits"] = [source_identity(n) for n in d["data"]["splits"]]
    if calib:
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
    """The record at `path`; CorruptRecordError (naming the path) if it is not a whole JSON object."""
    try:
        rec = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CorruptRecordError(f"{path}: not a readable record ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict):
        raise CorruptRecordError(f"{path}: not a readable record (a JSON {type(rec).__name__}, not an object)")
    return rec


def load_records(results_dir: str | Path, on_corrupt: Callable[[str], None] = warn) -> list[dict]:
    """Every record under <results_dir>/runs/; a corrupt one is skipped, with `on_corrupt` told why."""
    runs = Path(results_dir) / "runs"
    records = []
    for p in sorted(runs.glob("*.json")) if runs.exists() else []:
        try:
            records.append(load_record(p))
        except CorruptRecordError as e:
            on_corrupt(f"warning: skipping {e}")
    return records


def check_results_dir(results_dir: str | Path) -> None:
    """Fail before any work if <results_dir>/runs/ cannot take a record: not creatable, not writable, or full; then
    remove the temp files that killed writers left there."""
    runs = Path(results_dir) / "runs"
    fix = "a folder this user can write with >= 1 MiB free — choose another, e.g. results_dir=/tmp/results"
    try:
        free = probe_write(runs)
    except OSError as e:
        raise user_error("results_dir", results_dir, f"cannot write {runs} ({type(e).__name__}: {e.strerror or e})",
                         fix) from None
    if free < MIN_FREE_BYTES:
        raise user_error("results_dir", results_dir, f"{runs} has {free} bytes free, too few for a record", fix)
    remove_stale_tmp(runs)  # temp files of writes that were killed (atomic_file): a rerun leaves none behind


def provenance(extra: dict | None = None) -> dict:
    """What a record's numbers were made with: the commit (git_sha, "-dirty" with the changed source files in
    git_changed), package versions, the machine (hardware: host, CPU, GPU), when."""
    hw = hardware()
    p = {**git_state(), "versions": package_versions(), "hardware": hw, "machine": machine_name(hw),
         "python": platform.python_version(), "created_unix": time.time(),
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if extra:
        p.update(extra)
    return p


def make_record(cfg: RunConfig, metrics: dict, prov: dict, timings_s: dict, status: str = "complete",
                code_version: dict | None = None) -> dict:
    """`code_version`: harness.environment.code_version of the sources that determine the numbers; a record is
    reused only while it matches, and the report marks a row whose record does not (eval.code_version)."""
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
