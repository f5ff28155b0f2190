"""The registry and dispatch of speccascade_fast/backends/__init__.py: which backend runs which kind
of work where, "auto" resolved in one function, and calls a backend does not cover sent to the
reference. (What each backend computes is tested in its own module's tests.)"""
from __future__ import annotations

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends
from speccascade_fast.backends import reference

F32, F64 = torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.float64)


def test_every_backend_implements_what_the_registry_says():
    assert set(backends.REGISTRY) == set(backends.PREFERENCE)
    for name, entry in backends.REGISTRY.items():
        assert entry.kinds <= set(backends.KINDS), name
        assert callable(entry.module.is_available), name
        for kind in entry.kinds:
            assert callable(getattr(entry.module, kind)), (name, kind)
    assert backends.REGISTRY["cuda"].kinds == {"verify", "verify_ragged"}
    assert backends.REGISTRY["reference"].kinds == set(backends.KINDS)


def test_available_per_kind_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kind in backends.KINDS:
        assert backends.available(None, kind) == ("cpu", "reference"), kind
        assert backends.available("cpu", kind) == ("cpu", "reference"), kind
        assert backends.resolve("auto", None, kind, logits=(F32,), top_p=0.9) == "cpu", kind


def test_auto_takes_the_interpreter_for_verification_only(monkeypatch):
    """With TRITON_INTERPRET=1 the triton backend is available on the CPU; "auto" then picks it
    for a verification, but sampling and keep bounds stay on the compiled op."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.available(None) == ("triton", "cpu", "reference")
    assert backends.resolve("auto") == "triton"
    assert backends.resolve("auto", None, "verify_ragged") == "triton"
    assert backends.available(None, "sample") == ("triton", "cpu", "reference")
    assert backends.resolve("auto", None, "sample", logits=(F32,)) == "cpu"
    assert backends.resolve("triton", None, "sample", logits=(F32,)) == "triton"  # asked for
    assert backends.resolve("auto", None, "keep_bounds", logits=(F32,), top_p=0.9) == "cpu"


def test_covers():
    """The module docstring's table."""
    for name in ("cpu", "cuda"):
        assert backends.covers(name, "verify", F32, F32.bfloat16(), F32.half())
        assert not backends.covers(name, "verify", F32, F64)
        assert not backends.covers(name, "verify_ragged", F32, F32, F64)  # a fp64 bonus tensor
    assert backends.covers("triton", "verify", F64, F64)  # rounded to float32
    assert backends.covers("triton", "sample", F32) and backends.covers("triton", "sample", F32,
                                                                        greedy=False)
    assert not backends.covers("triton", "sample", F32, greedy=True)  # one argmax
    assert not backends.covers("triton", "sample", F64)
    assert backends.covers("triton", "keep_bounds", F32, top_p=0.9)
    assert not backends.covers("triton", "keep_bounds", F32, top_p=None)  # top-k: torch's top-k
    assert backends.covers("cpu", "keep_bounds", F32) and not backends.covers("cpu", "sample", F64)
    for kind in backends.KINDS:
        assert backends.covers("reference", kind, F64, greedy=True)


def test_resolve_names_the_available_backends_and_falls_back_to_the_reference():
    with pytest.raises(ValueError, match="backend='cuda' is not available here; choose 'auto' "
                                         "or one of cpu, reference"):
        backends.resolve("cuda", "cpu")
    with pytest.raises(ValueError, match="backend='nope'"):
        backends.resolve("nope")
    assert backends.resolve("cpu", "cpu", "verify", logits=(F64,)) == "reference"
    assert backends.resolve("auto", "cpu", "sample", logits=(F64,)) == "reference"
    assert backends.resolve("auto", "cpu", "keep_bounds", logits=(F64,), top_p=0.9) == "reference"


def test_get_and_verify_run_the_backend_or_the_reference():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(2, 4, 30, generator=g), torch.randn(2, 4, 30, generator=g)
    x = sc.sample(q[:, :3].reshape(-1, 30), seed=1).view(2, 3)
    args = dict(rule="token_v3", alpha=torch.full((2,), 0.3, dtype=torch.float64),
                temperature=torch.tensor([0.0, 0.9], dtype=torch.float64), top_k=None, top_p=0.8,
                seed=torch.tensor([4, 5]), positions=torch.tensor([0, 7]))
    want = sc.verify(q, x, p, rule="token_v3", alpha=0.3, temperature=args["temperature"],
                     top_p=0.8, seed=args["seed"], positions=args["positions"], backend="cpu")
    got = backends.get("cpu")(q, x, p, **args)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
    # a float64 call on the cpu backend: the reference's, exactly
    got = backends.verify("cpu", q.double(), x, p.double(), **args)
    want = reference.verify(q.double(), x, p.double(), **args)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))


def test_sample_dispatch():
    """The compiled op for CPU fp32 logits (with keep bounds from the dispatch), the torch race
    for the reference and float64, and one argmax when every row is known to be greedy."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 40, generator=g) * 2
    T = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    seed, pos = torch.arange(5), torch.arange(5) * 3
    want = backends.sample("reference", x, T, seed, pos, 7, 0.9)
    assert torch.equal(backends.sample("auto", x, T, seed, pos, 7, 0.9), want)
    assert torch.equal(backends.sample("auto", x.double(), T, seed, pos, 7, 0.9), want)
    zero = torch.zeros(5, dtype=torch.float64)
    assert torch.equal(backends.sample("auto", x, zero, seed, pos, greedy=True), x.argmax(-1))
