"""What can be checked of the "cuda" verification backend without a GPU (the kernels themselves
run in tests/gpu/test_cuda_backend.py):

* on the CPU it is never offered, and asking for it is a clear ValueError naming it;
* the dispatch sends calls it does not cover (fp64 logits) to the reference before any device
  check, exactly as for the cpu backend; truncated ones (top-k / top-p: keep bounds in the
  kernel) it does not;
* ``verify_ragged(backend="cuda")`` hands covered calls, whole and normalised, to the fused
  ragged op (``cuda.verify_ragged``, with the keep bounds the dispatch computed), and fp64 ones
  to the reference;
* the rule ids compiled into csrc/cuda (the enum of verify.cu, the rule count of verify.h that
  verify_cuda.cpp checks) are speccascade_fast.rules.RULES in order, as the Python side sends
  ``RULES.index(rule)``.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends
from speccascade_fast.backends import cuda, reference
from speccascade_fast.rules import FUSED_RULES  # the rules the kernels implement

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def _block(B=2, gamma=3, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, gamma + 1, V, generator=g)
    p = torch.randn(B, gamma + 1, V, generator=g)
    x = torch.randint(0, V, (B, gamma), generator=g)
    return q, x, p


def test_not_available_on_cpu():
    assert "cuda" not in backends.available()
    assert "cuda" not in backends.available(torch.device("cpu"))
    assert not cuda.is_available(None)
    assert not cuda.is_available("cpu")
    if not torch.cuda.is_available():
        assert not cuda.is_available("cuda")


def test_verify_with_backend_cuda_on_cpu_tensors_is_a_value_error():
    q, x, p = _block()
    with pytest.raises(ValueError, match="backend='cuda'"):
        sc.verify(q, x, p, rule="token_v3", alpha=0.3, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        sc.verify_ragged(q[0, :3], x[0], p[0], torch.tensor([0, 3]), rule="spec",
                         backend="cuda")


def test_module_rejects_cpu_tensors_by_name():
    q, x, p = _block()
    args = dict(rule="spec", alpha=torch.zeros(2, dtype=torch.float64),
                temperature=torch.ones(2, dtype=torch.float64), top_k=None, top_p=None,
                seed=torch.arange(2), positions=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        cuda.verify(q, x, p, **args)


def test_ragged_module_rejects_cpu_tensors_by_name():
    q, x, p = _block()
    args = dict(rule="spec", alpha=torch.zeros(2, dtype=torch.float64),
                temperature=torch.ones(2, dtype=torch.float64),
                seed=torch.arange(2), positions=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        cuda.verify_ragged(q[0, :3].contiguous(), x[0], torch.cat([p[0], p[1, :2]]),
                           torch.tensor([0, 2, 3]), None, **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_ragged_api_routes_cuda_to_the_fused_op(monkeypatch, dtype):
    """With the cuda backend "available" (patched, as on a GPU machine), verify_ragged sends a
    covered call to the fused ragged op in one piece, and an fp64 call to the reference."""
    from speccascade_fast import ragged

    monkeypatch.setattr(cuda, "is_available", lambda device=None: True)
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return reference_out

    monkeypatch.setattr(cuda, "verify_ragged", fake)
    g = torch.Generator().manual_seed(4)
    V, cu = 40, torch.tensor([0, 2, 5])
    q = torch.randn(5, V, generator=g).to(dtype)
    p = torch.randn(7, V, generator=g).to(dtype)
    bonus = torch.randn(2, V, generator=g).to(dtype)
    x = torch.randint(0, V, (5,), generator=g)
    f64 = dict(dtype=torch.float64)
    kw = dict(rule="token_v3", alpha=torch.tensor([0.2, 0.4], **f64),
              temperature=torch.tensor([0.0, 0.9], **f64), seed=torch.tensor([3, 4]),
              positions=torch.tensor([10, 20]), bonus_draft_logits=bonus)
    reference_out = ragged.verify_ragged(q, x, p, cu, backend="reference", **kw)
    got = ragged.verify_ragged(q, x, p, cu, backend="cuda", top_k=7, **kw)
    if dtype == torch.float64:
        assert not calls
        want = ragged.verify_ragged(q, x, p, cu, backend="reference", top_k=7, **kw)
        assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
        return
    assert got is reference_out and len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] is q and args[1] is x and args[2] is p and args[4] is bonus
    assert args[3].tolist() == [0, 2, 5]
    assert kwargs["rule"] == "token_v3" and kwargs["top_k"] == 7 and kwargs["top_p"] is None
    kd, kt, kb = kwargs["keep"]  # the bounds the dispatch computed (the C++ op, CPU tensors)
    want = backends.ragged_keep_bounds(q, p, bonus, cu, kwargs["temperature"], 7, None)
    assert all(torch.equal(a, b) for a, b in zip((kd, kt, kb), want))
    assert kwargs["alpha"].tolist() == [0.2, 0.4]
    assert kwargs["temperature"].tolist() == [0.0, 0.9]
    assert kwargs["seed"].tolist() == [3, 4] and kwargs["positions"].tolist() == [10, 20]


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.9)])
def test_truncated_calls_are_the_kernels(kw):
    q, x, p = _block(seed=3)
    args = dict(rule="token_v2", alpha=torch.full((2,), 0.2, dtype=torch.float64),
                temperature=torch.full((2,), 0.7, dtype=torch.float64), top_k=None, top_p=None,
                seed=torch.tensor([5, 6]), positions=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        cuda.verify(q, x, p, **{**args, **kw})


@pytest.mark.parametrize("kw", [dict(dtype=torch.float64), dict(dtype=torch.float64, top_p=0.9)])
def test_the_dispatch_sends_uncovered_calls_to_the_reference(kw):
    q, x, p = _block(seed=3)
    dtype = kw.pop("dtype", None)
    if dtype is not None:
        q, p = q.to(dtype), p.to(dtype)
    args = dict(rule="token_v2", alpha=torch.full((2,), 0.2, dtype=torch.float64),
                temperature=torch.full((2,), 0.7, dtype=torch.float64),
                top_k=kw.get("top_k"), top_p=kw.get("top_p"),
                seed=torch.tensor([5, 6]), positions=torch.tensor([0, 9]))
    assert not backends.covers("cuda", "verify", q, p)
    got = backends.verify("cuda", q, x, p, **args)
    want = reference.verify(q, x, p, **args)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        cuda.verify(q, x, p, **args)  # the module itself runs what it is handed


def test_compiled_rule_ids_follow_rules_in_order():
    h = (CSRC / "verify.h").read_text()  # the count verify_cuda.cpp checks rule ids against
    assert int(re.search(r"#define SC_VERIFY_NUM_RULES (\d+)", h).group(1)) == len(FUSED_RULES)

    cu = (CSRC / "verify.cu").read_text()
    enum = re.search(r"enum Rule : int \{(.*?)\};", cu, re.S).group(1)
    names = [n.strip() for n in enum.split(",") if n.strip()]
    assert names[-1] == "kNumRules"

    def camel(rule):
        return "k" + "".join(w.capitalize() for w in rule.split("_"))

    assert names[:-1] == [camel(r) for r in FUSED_RULES]
