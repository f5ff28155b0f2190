"""speccascade_fast.models on damaged inputs: truncated GGUF files, damaged cached conversions and
safetensors weights, a GGUF rewritten in place, SPECCASCADE_CACHE pointing at a file. CPU,
seconds (tiny models written on the spot)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from speccascade_fast import models as M
from tests.model_helpers import save_folder, tiny_llama, tiny_qwen2, tiny_tokenizer, write_tiny_gguf


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _logits(model, n=8):
    x = torch.arange(2, 2 + n).unsqueeze(0)
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("keep", [0, 10, 100, 1000, 5000, 0.5, -100])
def test_truncated_gguf_is_a_clear_error(tmp_path, keep):
    full = tmp_path / "full.gguf"
    write_tiny_gguf(tiny_llama(), full)
    data = full.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % (len(data) + 1)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:n])
    with pytest.raises(M.CorruptModelFileError) as e:
        M.load_model(cut, progress=False)
    msg = str(e.value)
    assert str(cut) in msg and "again" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)  # the CLI reports it in one line
    assert not (M.cache_dir() / "gguf").exists() or not any(
        M._is_complete(p) for p in (M.cache_dir() / "gguf").iterdir())


def test_damaged_cached_conversion_is_rebuilt(tmp_path, capsys):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_llama(), gguf)
    model, _ = M.load_model(gguf, dtype=torch.float32, progress=False)
    ref = _logits(model)
    (folder,) = (M.cache_dir() / "gguf").iterdir()
    weights = folder / "model.safetensors"
    for damage in (lambda b: b"\xff" * 16 + b[16:], lambda b: b[: len(b) // 2], lambda b: b""):
        weights.write_bytes(damage(weights.read_bytes()))
        capsys.readouterr()
        again, _ = M.load_model(gguf, dtype=torch.float32, progress=False)
        assert "converting it again" in capsys.readouterr().err
        torch.testing.assert_close(_logits(again), ref)
        assert M._is_complete(folder) and [p.name for p in folder.parent.iterdir()] == [
            folder.name]


def test_damaged_weights_of_a_plain_folder_name_the_folder(tmp_path):
    folder = save_folder(tiny_qwen2(), tiny_tokenizer(64), tmp_path / "hf-folder")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(M.CorruptModelFileError, match="hf-folder.*cannot be read.*again"):
        M.load_model(folder, progress=False)
    assert w.stat().st_size == 100  # not ours: never deleted


def test_gguf_rewritten_in_place_with_same_size_and_mtime_is_converted_again(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_llama(seed=0), gguf)
    first, _ = M.load_model(gguf, dtype=torch.float32, progress=False)
    st = gguf.stat()
    other = tmp_path / "other.gguf"
    write_tiny_gguf(tiny_llama(seed=1), other)  # the same architecture: the same size
    assert other.stat().st_size == st.st_size
    with open(gguf, "r+b") as f:  # in place: same inode
        f.write(other.read_bytes())
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (gguf.stat().st_size, gguf.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second, _ = M.load_model(gguf, dtype=torch.float32, progress=False)
    assert not torch.allclose(_logits(first), _logits(second))
    fresh, _ = M.load_model(other, dtype=torch.float32, progress=False)
    torch.testing.assert_close(_logits(second), _logits(fresh))
    # touched, or copied back with the same bytes: the conversion is kept (hash, not convert)
    (folder,) = [p for p in (M.cache_dir() / "gguf").iterdir() if p.name.startswith("tiny-")]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    os.utime(gguf)
    M.load_model(gguf, progress=False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    source = json.loads((folder / M._MARKER).read_text())["source"]
    assert source["mtime_ns"] == gguf.stat().st_mtime_ns and len(source["sha256"]) == 64


def test_cache_variable_pointing_at_a_file(tmp_path, monkeypatch):
    f = tmp_path / "a-file"
    f.write_text("x")
    for value in (str(f), str(f / "sub")):
        monkeypatch.setenv("SPECCASCADE_CACHE", value)
        with pytest.raises(ValueError, match="SPECCASCADE_CACHE=.*not a folder"):
            M.cache_dir()
        gguf = tmp_path / "tiny.gguf"
        if not gguf.exists():
            write_tiny_gguf(tiny_llama(), gguf)
        with pytest.raises(ValueError, match="SPECCASCADE_CACHE"):
            M.load_model(gguf, progress=False)
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path / "new" / "cache"))
    assert M.cache_dir() == tmp_path / "new" / "cache"  # missing folders are fine
    monkeypatch.delenv("SPECCASCADE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(f))
    with pytest.raises(ValueError, match="XDG_CACHE_HOME"):
        M.cache_dir()
