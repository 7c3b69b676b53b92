"""What a number was measured on: package versions, the CPU or GPU, the driver, the code's git commit. One capture,
used by run records (harness.records.provenance), benchmarks and GPU scripts alike."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path

from harness.assets import REPO_ROOT

PACKAGES = ("torch", "transformers", "datasets", "hydra-core", "lm_eval", "lmdeploy", "gguf", "numpy", "triton")


def package_versions(packages=PACKAGES) -> dict:
    """{package: version} of the installed distributions among `packages` (missing ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            # LMDeploy travels to the GPU machine as a bare package on PYTHONPATH, without distribution metadata
            try:
                out[pkg] = getattr(__import__(pkg.replace("-", "_")), "__version__", None)
            except Exception:
                pass
    return {k: v for k, v in out.items() if v is not None}


def git_sha() -> str | None:
    """HEAD of this checkout, with "-dirty" when tracked files differ from it."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=5).stdout.strip()
        sha = run("rev-parse", "HEAD")
        return (sha + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")) or None
    except Exception:
        return None


def sources_sha(paths) -> str:
    """sha256 prefix of the bytes of source files (paths relative to the repository root; a folder means every file
    under it but caches): the version of the code those files hold."""
    h = hashlib.sha256()
    for rel in sorted(paths):
        p = REPO_ROOT / rel
        files = sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts) if p.is_dir() else [p]
        for f in files:
            h.update(f"{f.relative_to(REPO_ROOT)}\n".encode())
            h.update(f.read_bytes() if f.exists() else b"(missing)")
    return h.hexdigest()[:12]


def code_version(parts: dict) -> dict:
    """{"hash": one hash over every part, "parts": {part name: hash of its sources}} for `parts` = {name: [paths]};
    the parts name what changed when two versions differ."""
    hashes = {name: sources_sha(paths) for name, paths in sorted(parts.items())}
    return {"hash": hashlib.sha256(repr(sorted(hashes.items())).encode()).hexdigest()[:12], "parts": hashes}


def changed_parts(old: dict | None, new: dict) -> list[str]:
    """Names of the parts whose sources differ between two code versions (every part when `old` is missing)."""
    old_parts = (old or {}).get("parts", {})
    return [k for k in sorted(new["parts"].keys() | old_parts.keys()) if old_parts.get(k) != new["parts"].get(k)]


def machine_name(hw: dict | None = None) -> str:
    """What a throughput number was measured on: the GPU's name where there is one, else the CPU model."""
    hw = hardware() if hw is None else hw
    return hw.get("gpu") or hw.get("cpu_model") or hw.get("processor") or "unknown"


def gpu() -> dict:
    """The first CUDA device and the driver (empty without one)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    out = {"gpu": p.name, "gpu_count": torch.cuda.device_count(), "gpu_memory_bytes": p.total_memory,
           "gpu_uuid": str(getattr(p, "uuid", "")), "sm_count": p.multi_processor_count, "cuda": torch.version.cuda}
    if out["gpu_count"] > 1:  # how the GPUs are linked (NVLink / PCIe) decides what tensor parallelism gains
        try:
            out["gpu_topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                                 timeout=20).stdout.strip()
        except Exception:
            out["gpu_topology"] = None
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20).stdout.strip()
        out["nvidia_smi"] = q
        out["driver"] = q.splitlines()[0].split(",")[1].strip() if q else None
    except Exception:
        out["driver"] = None
    return out


def hardware() -> dict:
    import torch

    hw = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    g = gpu()
    if g:
        hw.update(gpu=g["gpu"], cuda=g["cuda"], driver=g.get("driver"), gpu_count=g["gpu_count"])
    return hw


def environment() -> dict:
    """A flat summary for benchmark results: versions, CPU, GPU and driver, threads, load, time."""
    import torch

    env = {"python": platform.python_version(), **package_versions(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "load_average_1m": os.getloadavg()[0],
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_sha": git_sha()}
    hw = hardware()
    if "cpu_model" in hw:
        env["cpu_model"] = hw["cpu_model"]
    env.update(gpu())
    return env
