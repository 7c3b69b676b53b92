"""What a number was measured on: package versions, the host, the CPU or GPU, the driver, the code's git commit (and
the source files that differed from it). One capture, used by run records (harness.records.provenance), benchmarks
and GPU scripts alike."""
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


# what the harness itself writes inside the repository: records, tables, figures, executed notebooks and benchmark
# results (results/, the default results_dir), Hydra's run folders, and README.md's generated table excerpt
# (report.readme_excerpt). A change there is an output, not other code: it never makes a record "-dirty".
HARNESS_OUTPUTS = ("results/", "outputs/", "multirun/", "README.md")
MAX_CHANGED_FILES = 20  # a record names at most this many changed files (and says how many there were)
# a file git does not track counts only if it is code or config (a new module or preset changes what runs); records,
# tables and figures written to a results_dir elsewhere in the checkout do not
SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".cfg", ".sh")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5,
                          check=True).stdout


def is_harness_output(path: str) -> bool:
    return any(path == o or (o.endswith("/") and path.startswith(o)) for o in HARNESS_OUTPUTS)


def changed_sources() -> list[str] | None:
    """The files of this checkout that differ from HEAD (tracked files edited, staged, added or deleted; code and
    config files git does not track and does not ignore, marked " (untracked)"), less the harness's own outputs
    (HARNESS_OUTPUTS); None when this is not a git checkout."""
    try:
        tracked = _git("diff", "HEAD", "--name-only", "-z").split("\0")
        untracked = _git("ls-files", "--others", "--exclude-standard", "-z").split("\0")
    except Exception:  # no git, not a checkout, no HEAD yet
        return None
    return sorted({p for p in tracked if p and not is_harness_output(p)}) + \
        sorted(f"{p} (untracked)" for p in untracked if p.endswith(SOURCE_SUFFIXES) and not is_harness_output(p))


def git_state() -> dict:
    """{"git_sha": HEAD, with "-dirty" when source files differ from it (changed_sources: the harness's own outputs
    do not count), "git_changed": the first MAX_CHANGED_FILES of those files (only when dirty), "git_changed_count":
    how many there were (only when more)}; {"git_sha": None} outside a git checkout."""
    try:
        sha = _git("rev-parse", "HEAD").strip()
    except Exception:
        return {"git_sha": None}
    changed = changed_sources() or []
    out = {"git_sha": sha + ("-dirty" if changed else "")}
    if changed:
        out["git_changed"] = changed[:MAX_CHANGED_FILES]
        if len(changed) > MAX_CHANGED_FILES:
            out["git_changed_count"] = len(changed)
    return out


def git_sha() -> str | None:
    """HEAD of this checkout, with "-dirty" when source files differ from it (git_state)."""
    return git_state()["git_sha"]


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


# what tells two machines apart (provenance.hardware): a throughput ratio is formed only between records that agree on
# every one of these (machine_differences); "hostname" is left out of the comparison where a record predates it
MACHINE_KEYS = ("hostname", "cpu_model", "cpu_count", "gpu", "gpu_count")


def machine_fingerprint(hw: dict | None) -> dict:
    """{field: value} of MACHINE_KEYS that a hardware description (hardware(), provenance.hardware) holds."""
    return {k: (hw or {})[k] for k in MACHINE_KEYS if (hw or {}).get(k) is not None}


def machine_differences(a: dict | None, b: dict | None) -> list[str]:
    """The MACHINE_KEYS in which two hardware descriptions differ ([]: the same machine as far as both say). A GPU
    or CPU field missing on one side is a difference; the hostname only counts where both recorded one."""
    fa, fb = machine_fingerprint(a), machine_fingerprint(b)
    return [k for k in MACHINE_KEYS if fa.get(k) != fb.get(k) and (k != "hostname" or (k in fa and k in fb))]


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

    hw = {"hostname": platform.node() or None, "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
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
           "machine": platform.processor() or platform.machine(), "hostname": platform.node() or None,
           "load_average_1m": os.getloadavg()[0],
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_state()}
    hw = hardware()
    if "cpu_model" in hw:
        env["cpu_model"] = hw["cpu_model"]
    env.update(gpu())
    return env
