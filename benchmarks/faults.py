"""Fault injection (issue 15): SIGKILL at seeded random points of quantization, evaluation and record writing, a full
disk, a read-only results_dir and cache, a corrupt quantized-cache file and a truncated record; after each fault the
same command is run again and must give the record an uninterrupted run gives.

    python -m benchmarks.faults                    # 3 kill trials + the 5 fault scenarios (~14 min on 2 shared cores)
    python -m benchmarks.faults --trials 6         # + AWQ's block loop killed (~22 min)
    python -m benchmarks.faults --trials 20 --seed 1
    python -m benchmarks.faults --trials 2 --faults corrupt_files --mechanism shim --out /tmp/f   # a quick look
    python -m benchmarks.faults --quick              # issue 27's scenarios only (~2-3 min): faults_quick.{json,md}
    python -m benchmarks.faults --trials 3 --faults all          # everything

Issue 27's scenarios (data loss, tampered files, protocol limits: benchmarks/faults_integrity.py) count what went
wrong by kind: records lost or wrong, records mislabelled, user files destroyed, files written outside their
destination; every count must be 0 (the exit status is 1 otherwise, or when any trial has a problem).

What "the same record" means: the same run_id, status complete, the same config, and the same metrics to the last
digit except what is measured rather than computed (timings, tokens/s, resident memory, `from_cache`: MEASURED).
After every rerun, <results_dir>/runs/ holds exactly that one record: no partial, duplicate or temp file, and the
cache holds no temp file (the preflight removes killed writers' leftovers). A kill during quantization is checked only
by the rerun's final record, so the trials stay valid when quantization learns to resume from a finished block.

Kill points: the child's stderr is watched; when the stage's first line appears (`[run] quantizing:`,
`[run] evaluating`), the child is SIGKILLed after a seeded random delay within the stage's length in the reference
run. Inside a record's atomic write no log line can time a kill, so benchmarks/fault_inject.py kills there at one of
four seeded points (temp file created; half written; whole, before the rename; right after the rename).

Full and read-only disks (`--mechanism`): `mount` (as root with CAP_SYS_ADMIN: small tmpfs mounts and read-only bind
mounts in a private mount namespace of this process, so nothing outlives it) or `shim` (benchmarks/fault_inject.py
fails the child's writes under a folder with ENOSPC / EROFS at the OS-call level); `auto` takes mount when it works.

Every trial has its own results_dir and QH_CACHE (symlinks to the shared model and text downloads, copies of the token
cache), under --work; kills during evaluation and record writing start with the reference run's quantized weights
cached (as a sweep's later configs do), kills during quantization and the disk faults start cold. Results: results/benchmarks/faults.json and faults.md."""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "benchmarks"
EVAL = ["data.splits=[milton]", "eval=ppl", "eval.perplexity.seqlen=64",
        "eval.perplexity.max_windows=4", "eval.perplexity.batch_size=4", "progress=false"]
# the cheapest runs that still have every stage: RTN (quantization ~15 s here), and AWQ's block-by-block loop
# (calibration capture, block forwards, quantization) without its scale and clipping searches (each ~3 min here)
CONFIGS = {
    "rtn": ["quant=rtn_w4", *EVAL],
    "awq": ["quant=awq_w4", "quant.search_scale=false", "quant.clip=false", "quant.calib.n_samples=4",
            "quant.calib.seqlen=64", "quant.search_samples=4", *EVAL],
}
MARKERS = {"quantize": "[run] quantizing:", "evaluate": "[run] evaluating", "wrote": "[run] wrote "}
PHASES = ("open", "write", "replace", "replaced")  # benchmarks/fault_inject.py QH_FAULT_KILL
MEASURED = {"tokens_per_s", "seconds", "peak_memory_quantize", "host_memory", "measured", "block_seconds", "from_cache",
            "throughput"}
FAULTS = ("results_full", "results_readonly", "cache_full", "cache_readonly", "corrupt_files")
SHARED_CACHE = ("downloads", "unpacked", "models")  # big and read-only for a run: linked, not copied
RUN_TIMEOUT_S = 600


def computed(metrics):
    """`metrics` without what is measured (MEASURED): what must be equal to the last digit."""
    if isinstance(metrics, dict):
        return {k: computed(v) for k, v in metrics.items() if k not in MEASURED and not k.endswith("_s")}
    if isinstance(metrics, list):
        return [computed(v) for v in metrics]
    return metrics


# ----------------------------------------------------------------------------------------------- full and read-only disks


def private_mount_namespace() -> bool:
    """Enter a mount namespace of this process (mounts made here vanish with it); True when mounting works here."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        return False
    ok = subprocess.run(["mount", "--make-rprivate", "/"], capture_output=True).returncode == 0
    probe = Path(f"/tmp/qh-faults-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = ok and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                               capture_output=True).returncode == 0
    subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Disk:
    """Makes a folder full or read-only and gives it back, by mounts or by the shim (the child's env)."""

    def __init__(self, mechanism: str, folder: Path, kind: str):
        self.mechanism, self.folder, self.kind = mechanism, folder, kind  # kind: full | readonly
        self.flag = folder.parent / f".{folder.name}.{kind}"  # shim: the fault holds while this file exists
        folder.mkdir(parents=True, exist_ok=True)
        if mechanism == "mount":
            if kind == "full":  # a small tmpfs, filled to the last byte when the fault starts
                keep = [p for p in folder.iterdir()]
                stash = folder.parent / f".{folder.name}.stash"
                shutil.rmtree(stash, ignore_errors=True)
                if keep:
                    shutil.copytree(folder, stash, symlinks=True)
                sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder))
                if keep:
                    shutil.copytree(stash, folder, symlinks=True, dirs_exist_ok=True)
                    shutil.rmtree(stash)
            else:
                sh("mount", "--bind", str(folder), str(folder))

    def env(self) -> dict:
        if self.mechanism != "shim":
            return {}
        return {"QH_FAULT_ENOSPC" if self.kind == "full" else "QH_FAULT_EROFS": str(self.folder),
                "QH_FAULT_WHEN": str(self.flag)}

    def on(self) -> None:
        if self.mechanism == "shim":
            self.flag.write_text("")
        elif self.kind == "full":
            with open(self.folder / ".filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
        else:
            sh("mount", "-o", "remount,bind,ro", str(self.folder))

    def off(self) -> None:
        if self.mechanism == "shim":
            self.flag.unlink(missing_ok=True)
        elif self.kind == "full":
            (self.folder / ".filler").unlink(missing_ok=True)
        else:
            sh("mount", "-o", "remount,bind,rw", str(self.folder))

    def release(self) -> None:
        self.off()
        if self.mechanism == "mount":
            if self.kind == "full":  # keep what the run wrote: copy it out of the tmpfs
                stash = self.folder.parent / f".{self.folder.name}.stash"
                shutil.copytree(self.folder, stash, symlinks=True)
                sh("umount", str(self.folder))
                shutil.copytree(stash, self.folder, symlinks=True, dirs_exist_ok=True)
                shutil.rmtree(stash)
            else:
                sh("umount", str(self.folder))


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    rc: int
    seconds: float
    lines: list  # (seconds since start, line)
    killed_at: str | None = None  # the last line seen when the kill came

    def log(self) -> str:
        return "\n".join(line for _t, line in self.lines)

    def at(self, marker: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(marker)), None)


@dataclass
class Group:
    """One trial's folders: results_dir, QH_CACHE and Hydra's run folder."""
    root: Path
    source_cache: Path
    results: Path = field(init=False)
    cache: Path = field(init=False)

    def __post_init__(self):
        self.results, self.cache = self.root / "results", self.root / "cache"
        self.cache.mkdir(parents=True)
        for name in SHARED_CACHE:
            if (self.source_cache / name).exists():
                (self.cache / name).symlink_to((self.source_cache / name).resolve())
        for name in ("tokens", "tasks"):
            if (self.source_cache / name).exists():
                shutil.copytree(self.source_cache / name, self.cache / name)
        if (self.source_cache / "file_sha256.json").exists():
            shutil.copy(self.source_cache / "file_sha256.json", self.cache)

    def args(self, config: str) -> list[str]:
        return [*CONFIGS[config], f"results_dir={self.results}", f"hydra.run.dir={self.root / 'hydra'}"]

    def runs(self) -> list[Path]:
        d = self.results / "runs"
        return sorted(d.iterdir()) if d.exists() else []


def start(group: Group, config: str | None, env_extra: dict | None = None, shim: bool = False,
          argv: list[str] | None = None):
    """Start `experiments.run` with the config's arguments, or `argv` (a module and its arguments), in the group's
    cache; stdout is kept too (a line a refused command prints there must not leak a secret either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QH_FAULT_") and k != "HARNESS_DEBUG"}
    env.update({"QH_CACHE": str(group.cache), "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    argv = argv or ["experiments.run", *group.args(config)]
    head = ["-m", "benchmarks.fault_inject"] if shim else ["-m"]
    proc = subprocess.Popen([sys.executable, *head, *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines, t0 = [], time.monotonic()

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n").split("\r")[-1]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, t0, reader


def finish(proc, lines, t0, reader, killed_at=None) -> Run:
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=10)
    return Run(proc.returncode, time.monotonic() - t0, lines, killed_at)


def run(group: Group, config: str, env_extra: dict | None = None, shim: bool = False, on_line=None) -> Run:
    """Run to the end; `on_line(marker)`: called once when a MARKERS line first appears (e.g. to start a fault)."""
    proc, lines, t0, reader = start(group, config, env_extra, shim)
    fired = set()
    while proc.poll() is None:
        if on_line:
            for name, marker in MARKERS.items():
                if name not in fired and any(line.startswith(marker) for _t, line in list(lines)):
                    fired.add(name)
                    on_line(name)
        time.sleep(0.05)
    return finish(proc, lines, t0, reader)


def run_argv(group: Group, argv: list[str], env_extra: dict | None = None, shim: bool = False) -> Run:
    """Run a module with its arguments (`["experiments.export", "quant=rtn_w4", "--out", ...]`) to the end."""
    return finish(*start(group, None, env_extra, shim, argv=argv))


def run_killed(group: Group, config: str, stage: str, delay_s: float) -> Run:
    """SIGKILL `delay_s` after the stage's first line; rc 0 if the run ended first."""
    proc, lines, t0, reader = start(group, config)
    seen = None
    while proc.poll() is None:
        if seen is None and any(line.startswith(MARKERS[stage]) for _t, line in list(lines)):
            seen = time.monotonic()
        if seen is not None and time.monotonic() - seen >= delay_s:
            last = lines[-1][1] if lines else ""
            os.killpg(proc.pid, signal.SIGKILL)
            return finish(proc, lines, t0, reader, killed_at=last)
        time.sleep(0.02)
    return finish(proc, lines, t0, reader)


# ----------------------------------------------------------------------------------------------- checks


@dataclass
class Reference:
    config: str
    record: dict
    stage_s: dict  # quantize / evaluate: seconds in the uninterrupted run
    run: Run
    group: Group


def problems_after_rerun(group: Group, ref: Reference, rerun: Run) -> list[str]:
    """Why the rerun's outcome is not the uninterrupted run's: [] when it is."""
    out = []
    if rerun.rc != 0:
        out.append(f"rerun exit {rerun.rc}: {rerun.log()[-400:]}")
    record = record_problems(group, ref)
    names = [p for p in record if p.startswith("runs/ holds")]  # where the record is, then leftovers, then contents
    out += names
    for sub in ("quantized", "tokens", ""):
        d = group.cache / sub
        left = [p.name for p in d.glob(".*.tmp")] if d.is_dir() else []
        if left:
            out.append(f"temp files left in {d}: {left}")
    return out + [p for p in record if p not in names]


def record_problems(group: Group, ref: Reference) -> list[str]:
    """Why the record in runs/ is not the uninterrupted run's (whole, complete, same config and metrics): [] if it is."""
    names = [p.name for p in group.runs()]
    want = f"{ref.record['run_id']}.json"
    out = [] if names == [want] else [f"runs/ holds {names}, not [{want}]"]
    path = group.results / "runs" / want
    if path.exists():
        try:
            rec = json.loads(path.read_text())
        except ValueError as e:
            return out + [f"{path} does not parse ({e})"]
        if rec.get("run_id") != ref.record["run_id"] or rec.get("status") != "complete":
            out.append(f"run_id/status {rec.get('run_id')}/{rec.get('status')}")
        cfg, ref_cfg = dict(rec.get("config", {})), dict(ref.record["config"])
        cfg.pop("results_dir", None), ref_cfg.pop("results_dir", None)
        if cfg != ref_cfg:
            out.append("config differs")
        if computed(rec.get("metrics")) != computed(ref.record["metrics"]):
            out.append(f"metrics differ: {diff(computed(rec.get('metrics')), computed(ref.record['metrics']))}")
    return out


def diff(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return diff(a.get(k), b.get(k), f"{path}.{k}")
    return f"{path}: {a!r} vs {b!r}"


def error_line(r: Run) -> str:
    return r.lines[-1][1] if r.lines else ""


# ----------------------------------------------------------------------------------------------- trials


class Suite:
    def __init__(self, work: Path, mechanism: str, seed: int):
        self.work, self.mechanism, self.rng = work, mechanism, random.Random(seed)
        self.source_cache = Path(os.environ.get("QH_CACHE", ROOT / ".cache"))
        self.refs: dict[str, Reference] = {}
        self.n = 0

    def group(self, name: str, warm_from: Group | None = None) -> Group:
        """A fresh trial folder; `warm_from`: with that group's quantized weights cached (as after an earlier run
        of a sweep), so a trial about evaluation or record writing does not pay for quantizing twice."""
        self.n += 1
        g = Group(self.work / f"{self.n:02d}-{name}", self.source_cache)
        if warm_from is not None:  # hard links: cache files are only ever replaced whole (atomic_file), never edited
            shutil.copytree(warm_from.cache / "quantized", g.cache / "quantized", copy_function=os.link)
        return g

    def reference(self, config: str) -> Reference:
        if config not in self.refs:
            g = self.group(f"reference-{config}")
            r = run(g, config)
            if r.rc != 0:
                raise SystemExit(f"the uninterrupted {config} run failed:\n{r.log()[-3000:]}")
            rec = json.loads(g.runs()[0].read_text())
            q, e, w = (r.at(MARKERS[k]) for k in ("quantize", "evaluate", "wrote"))
            self.refs[config] = Reference(config, rec, {"quantize": e - q, "evaluate": w - e}, r, g)
            print(f"[faults] reference {config}: {r.seconds:.1f} s (quantize {e - q:.1f} s, evaluate {w - e:.1f} s)",
                  file=sys.stderr, flush=True)
        return self.refs[config]

    def kill(self, stage: str, config: str) -> dict:
        ref = self.reference(config)
        g = self.group(f"kill-{stage}-{config}", warm_from=None if stage == "quantize" else ref.group)
        t = time.monotonic()
        row = {"trial": f"kill during {stage}", "config": config}
        if stage == "record":
            phase = self.rng.choice(PHASES)
            first = run(g, config, {"QH_FAULT_KILL": f"{g.results / 'runs'}:{phase}"}, shim=True)
            row["kill_point"] = f"record write: {phase}"
            landed = [p.name for p in g.runs() if p.suffix == ".json"]
            # the kill came after the rename: the record is whole and a rerun must reuse it; before: no record at all
            want = [f"{ref.record['run_id']}.json"] if phase == "replaced" else []
            early = [] if landed == want else [f"after the kill runs/ holds {landed}, expected {want}"]
        else:
            delay = self.rng.uniform(0, ref.stage_s[stage])
            first = run_killed(g, config, stage, delay)
            row["kill_point"] = f"{stage} +{delay:.1f} s of {ref.stage_s[stage]:.1f} s"
            row["last_line_before_kill"] = (first.killed_at or "")[:160]
            early = []
            if any(p.suffix == ".json" for p in g.runs()):
                # a whole record equal to the reference's means the kill came after the run had written it (a quick
                # run can finish within the delay drawn from the reference's stage time); any other record is harm
                wrong = record_problems(g, ref)
                late = not wrong and (stage == "evaluate" or MARKERS["evaluate"] in first.log())
                if late:
                    row["kill_point"] += " (after the record was written)"
                else:
                    early = [f"a record after a kill during {stage}: {[p.name for p in g.runs()]} {wrong}"]
        row["killed"] = first.rc == -signal.SIGKILL
        rerun = run(g, config)
        row["problems"] = early + problems_after_rerun(g, ref, rerun) if row["killed"] else []
        row["rerun_reused_quantized_cache"] = "quantized weights from cache" in rerun.log()
        row["seconds"] = round(time.monotonic() - t, 1)
        return row

    # each fault scenario: the fault, the run that meets it, then the same command with the fault gone
    def results_fault(self, kind: str) -> dict:
        ref = self.reference("rtn")
        g = self.group(f"results-{kind}")
        t = time.monotonic()
        disk = Disk(self.mechanism, g.results, kind)
        problems, shim = [], self.mechanism == "shim"
        try:
            disk.on()  # 1. at the start: the preflight refuses before the model loads
            at_start = run(g, "rtn", disk.env(), shim=shim)
            disk.off()
            msg1 = error_line(at_start)
            if at_start.rc != 2 or not msg1.startswith("error: results_dir: ") or "[run] loading" in at_start.log():
                problems.append(f"at start: exit {at_start.rc}, {msg1!r}")
            # 2. during the evaluation: the record cannot be written at the end; a one-line error naming it
            mid = run(g, "rtn", disk.env(), shim=shim, on_line=lambda m: disk.on() if m == "evaluate" else None)
            msg2 = error_line(mid)
            if mid.rc != 2 or not msg2.startswith("error: results_dir: ") or f"{ref.record['run_id']}.json" not in msg2:
                problems.append(f"mid-run: exit {mid.rc}, {msg2!r}")
            disk.off()
            if [p.name for p in g.runs() if p.name != ".filler"]:
                problems.append(f"mid-run left {[p.name for p in g.runs()]}")
        finally:
            disk.release()
        rerun = run(g, "rtn")  # 3. the same command, the fault gone
        problems += problems_after_rerun(g, ref, rerun)
        if "quantized weights from cache" not in rerun.log():
            problems.append("the rerun quantized again (the failed run's cache was not kept)")
        return {"trial": f"results_dir {kind} (at start, then during evaluation)", "config": "rtn",
                "fails_after_s": round(at_start.seconds, 1), "message_at_start": msg1[:240],
                "message_mid_run": msg2[:240], "problems": problems, "seconds": round(time.monotonic() - t, 1)}

    def cache_fault(self, kind: str) -> dict:
        ref = self.reference("rtn")
        g = self.group(f"cache-{kind}")
        t = time.monotonic()
        folder = g.cache / "quantized" if kind == "full" else g.cache
        disk = Disk(self.mechanism, folder, kind)
        try:
            disk.on()
            r = run(g, "rtn", disk.env(), shim=self.mechanism == "shim")
        finally:
            disk.release()
        warning = next((line for _t, line in r.lines if "warning: the cache" in line), "")
        problems = problems_after_rerun(g, ref, r)  # the run itself goes on: its record is the reference's
        if not warning:
            problems.append("no warning about the cache")
        if list((g.cache / "quantized").glob("*.safetensors")):
            problems.append("a quantized-weight file was written into an unusable cache")
        return {"trial": f"cache {kind} (QH_CACHE{'/quantized' if kind == 'full' else ''})", "config": "rtn",
                "message": warning[:240], "problems": problems, "seconds": round(time.monotonic() - t, 1)}

    def corrupt_files(self) -> dict:
        """A truncated quantized-cache file and a truncated record at once (what a disk that filled up mid-write
        leaves, had the writes not been atomic): each named in one line, both recomputed."""
        ref = self.reference("rtn")
        g = self.group("corrupt-files")
        t = time.monotonic()
        shutil.copytree(ref.group.cache / "quantized", g.cache / "quantized")
        victim = next((g.cache / "quantized").glob("*.safetensors"))
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        record = g.results / "runs" / f"{ref.record['run_id']}.json"
        record.parent.mkdir(parents=True)
        blob = (ref.group.results / "runs" / record.name).read_bytes()
        record.write_bytes(blob[: len(blob) // 3])
        r = run(g, "rtn")
        named = {p: next((line for _t, line in r.lines if str(p) in line), "") for p in (victim, record)}
        problems = problems_after_rerun(g, ref, r)
        problems += [f"no line names {p}" for p, line in named.items() if not line]
        return {"trial": "truncated quantized-cache file + truncated record", "config": "rtn",
                "message": " / ".join(line[:200] for line in named.values()), "problems": problems,
                "seconds": round(time.monotonic() - t, 1)}


def kill_plan(trials: int, rng: random.Random) -> list[tuple[str, str]]:
    """(stage, config) of each kill trial: stages in turn, quantization kills alternating RTN and AWQ's loop."""
    stages = [("quantize", "evaluate", "record")[i % 3] for i in range(trials)]
    plan, q = [], 0
    for s in stages:
        if s == "quantize":
            plan.append((s, ("rtn", "awq")[q % 2]))
            q += 1
        else:
            plan.append((s, "rtn"))
    rng.shuffle(plan)
    return plan


COUNTS = ("records_lost_or_wrong", "records_mislabelled", "user_files_destroyed", "files_outside_destination")


def counts_of(row: dict) -> dict:
    """A trial's harm, by kind (benchmarks/faults_integrity.py COUNTS); a kill or disk trial with a problem lost or
    got a record wrong (its check is the rerun's record)."""
    return row.get("counts") or {k: int(k == "records_lost_or_wrong" and bool(row["problems"])) for k in COUNTS}


def render(result: dict) -> str:
    s = result["summary"]
    harm = ", ".join(f"{k.replace('_', ' ')}: {s[k]}" for k in COUNTS)
    lines = [f"# Fault injection ({result['created']})", "",
             f"`{result['command']}` on {result['machine']} (load average {result['load_average']}); disk faults "
             f"by `{result['mechanism']}`.", "",
             f"**{s['trials']} trials** ({s['kills']} SIGKILLs: {s['kills_by_stage']}; {s['faults']} fault scenarios), "
             f"**{harm}**; trials with a problem: {s['trials_with_problems']}; {s['seconds']:.0f} s.", "",
             "| trial | config | kill point / fault | message | problems | s |", "|---|---|---|---|---|---|"]
    for row in result["trials"]:
        point = row.get("kill_point") or row.get("message_at_start") or (
            f"fails after {row['fails_after_s']} s" if "fails_after_s" in row else "")
        msg = row.get("message") or row.get("message_mid_run") or row.get("last_line_before_kill") or ""
        cell = lambda x: str(x).replace("|", "\\|")[:160]  # noqa: E731
        lines.append(f"| {row['trial']} | {row['config']} | {cell(point)} | {cell(msg)} | "
                     f"{cell('; '.join(row['problems']) or 'none')} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks import faults_integrity as FI  # issue 27's scenarios (they use this module's helpers)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3,
                    help="SIGKILL trials, stages in turn (quantize, evaluate, record); quantization kills alternate RTN "
                         "and AWQ's block loop, so AWQ joins from --trials 4")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}, "
                    f"the issue-27 scenarios ({','.join(FI.SCENARIOS)}), all, or none")
    ap.add_argument("--quick", action="store_true", help="the issue-27 scenarios only, no SIGKILL trials (a few "
                    "minutes): --trials 0 --faults " + ",".join(FI.SCENARIOS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mechanism", choices=("auto", "mount", "shim"), default="auto")
    ap.add_argument("--work", type=Path, default=None, help="trial folders (default: a temp folder, removed after)")
    ap.add_argument("--out", type=Path, default=OUT, help="where faults.json and faults.md go")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.faults = 0, ",".join(FI.SCENARIOS)
    known = [*FAULTS, *FI.SCENARIOS]
    faults = known if args.faults == "all" else [f for f in args.faults.split(",") if f and f != "none"]
    unknown = set(faults) - set(known)
    if unknown:
        ap.error(f"--faults: unknown {sorted(unknown)}; known: {', '.join(known)}")
    mounts = args.mechanism != "shim" and private_mount_namespace()  # before any thread starts
    if args.mechanism == "mount" and not mounts:
        ap.error("--mechanism mount: mounting does not work here (needs root with CAP_SYS_ADMIN); use shim")
    mechanism = "mount" if mounts else "shim"
    work = args.work or Path(f"/tmp/qh-faults-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    suite = Suite(work, mechanism, args.seed)
    t0, rows = time.monotonic(), []
    try:
        jobs = [(lambda s=s, c=c: suite.kill(s, c)) for s, c in kill_plan(args.trials, suite.rng)]
        jobs += [{"results_full": lambda: suite.results_fault("full"),
                  "results_readonly": lambda: suite.results_fault("readonly"),
                  "cache_full": lambda: suite.cache_fault("full"), "cache_readonly": lambda: suite.cache_fault("readonly"),
                  "corrupt_files": suite.corrupt_files,
                  **{name: (lambda fn=fn: fn(suite)) for name, fn in FI.SCENARIOS.items()}}[f] for f in faults]
        for job in jobs:
            row = job()
            rows.append(row)
            print(f"[faults] {row['trial']} ({row['config']}): {row.get('kill_point', '')} "
                  f"{'; '.join(row['problems']) or 'ok'} ({row['seconds']} s)", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    kills = [r for r in rows if r["trial"].startswith("kill")]
    by_stage = {}
    for r in kills:
        if r["killed"]:
            stage = r["trial"].split()[-1]
            by_stage[stage] = by_stage.get(stage, 0) + 1
    from harness.environment import machine_name

    result = {
        "command": "python -m benchmarks.faults --quick" if args.quick else
                   f"python -m benchmarks.faults --trials {args.trials} --seed {args.seed} --faults {args.faults}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()], "mechanism": mechanism, "seed": args.seed,
        "configs": CONFIGS,
        "references": {k: {"run_id": v.record["run_id"], "seconds": round(v.run.seconds, 1), "stage_s": v.stage_s}
                       for k, v in suite.refs.items()},
        "summary": {"trials": len(rows), "kills": sum(r["killed"] for r in kills), "kills_by_stage": by_stage,
                    "kills_missed": sum(not r["killed"] for r in kills), "faults": len(rows) - len(kills),
                    **{k: sum(counts_of(r)[k] for r in rows) for k in COUNTS},
                    "trials_with_problems": sum(bool(r["problems"]) for r in rows),
                    "seconds": round(time.monotonic() - t0, 1)},
        "trials": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from harness.records import write_json_atomic

    stem = "faults_quick" if args.quick else "faults"  # the quick mode never replaces the full suite's results
    write_json_atomic(args.out / f"{stem}.json", result)
    (args.out / f"{stem}.md").write_text(render(result))
    s = result["summary"]
    print(f"[faults] {s['trials']} trials, {s['kills']} kills {s['kills_by_stage']}, "
          + ", ".join(f"{k.replace('_', ' ')}: {s[k]}" for k in COUNTS)
          + f", trials with a problem: {s['trials_with_problems']}, {s['seconds']:.0f} s -> {args.out / stem}.json",
          file=sys.stderr)
    return 1 if s["trials_with_problems"] or any(s[k] for k in COUNTS) else 0


if __name__ == "__main__":
    from benchmarks import faults as the_module  # one copy of CONFIGS and the helpers, which faults_integrity uses

    sys.exit(the_module.main())
