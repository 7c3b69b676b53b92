"""Provenance that tells the truth (issue 28): a record's "-dirty" flag is set by changed source files only, never by
what the harness itself writes inside the repository (results/, README's generated excerpt), and it names the files;
the machine a number was measured on is told apart by host, CPU and GPU."""
from __future__ import annotations

import subprocess

import pytest

import harness.environment as env


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout with a source file, a committed record and a README, as the harness's root."""
    for rel, text in {"harness/x.py": "a = 1\n", "results/runs/r.json": "{}\n", "results/tables/table1.md": "t\n",
                      "README.md": "readme\n", "conf/c.yaml": "k: 1\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "c")
    monkeypatch.setattr(env, "REPO_ROOT", tmp_path)
    return tmp_path


def test_a_clean_checkout_is_not_dirty(checkout):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    assert env.git_state() == {"git_sha": head}
    assert env.git_sha() == head


def test_the_harness_outputs_do_not_make_a_record_dirty(checkout):
    (checkout / "results/runs/r.json").write_text('{"new": 1}\n')  # a record rewritten by a run
    (checkout / "results/runs/s.json").write_text("{}\n")  # a new record
    (checkout / "results/tables/table1.md").unlink()  # the report replaces its tables
    (checkout / "README.md").write_text("readme\nexcerpt\n")  # report.readme_excerpt rewrites its block
    assert not env.git_state()["git_sha"].endswith("-dirty")
    assert "git_changed" not in env.git_state()


def test_changed_sources_are_named(checkout):
    (checkout / "harness/x.py").write_text("a = 2\n")
    (checkout / "conf/c.yaml").unlink()
    (checkout / "harness/new.py").write_text("")  # not yet added: it still changes what runs
    (checkout / "results/runs/r.json").write_text('{"new": 1}\n')
    (checkout / "elsewhere/runs").mkdir(parents=True)  # a run with results_dir=elsewhere: records, not code
    (checkout / "elsewhere/runs/s.json").write_text("{}\n")
    state = env.git_state()
    assert state["git_sha"].endswith("-dirty")
    assert state["git_changed"] == ["conf/c.yaml", "harness/x.py", "harness/new.py (untracked)"]
    _git(checkout, "add", "harness/x.py")  # staged counts too: it is not HEAD
    assert env.git_state()["git_changed"] == state["git_changed"]


def test_the_list_is_capped_and_says_how_many(checkout):
    n = env.MAX_CHANGED_FILES + 5
    for i in range(n):
        (checkout / "harness" / f"m{i:02d}.py").write_text("")
    state = env.git_state()
    assert len(state["git_changed"]) == env.MAX_CHANGED_FILES and state["git_changed_count"] == n


def test_outside_a_checkout_there_is_no_sha(tmp_path, monkeypatch):
    monkeypatch.setattr(env, "REPO_ROOT", tmp_path)
    assert env.git_state() == {"git_sha": None} and env.changed_sources() is None


def test_a_record_carries_the_state_and_the_machine(checkout):
    from harness.records import provenance

    (checkout / "harness/x.py").write_text("a = 2\n")
    p = provenance()
    assert p["git_sha"].endswith("-dirty") and p["git_changed"] == ["harness/x.py"]
    assert env.machine_fingerprint(p["hardware"])["hostname"]  # the host, beside the CPU (and GPU) it has
    assert env.machine_differences(p["hardware"], env.hardware()) == []


def test_machines_are_told_apart_by_host_cpu_and_gpu():
    xeon = {"hostname": "a", "cpu_model": "Intel Xeon", "cpu_count": 2, "platform": "x"}
    assert env.machine_differences(xeon, {**xeon, "platform": "y", "torch_threads": 1}) == []
    assert env.machine_differences(xeon, {**xeon, "hostname": "b"}) == ["hostname"]
    assert env.machine_differences(xeon, {**xeon, "cpu_count": 16}) == ["cpu_count"]
    assert env.machine_differences(xeon, {**xeon, "gpu": "NVIDIA H100", "gpu_count": 1}) == ["gpu", "gpu_count"]
    older = {k: v for k, v in xeon.items() if k != "hostname"}  # a record from before the host was recorded
    assert env.machine_differences(xeon, older) == []
    assert env.machine_differences(older, {**older, "cpu_model": "AMD EPYC"}) == ["cpu_model"]
