"""Keep bounds (speccascade_fast/truncation.py) describe exactly the reference's truncated support;
every implementation the dispatch (``backends.keep_bounds``) may pick here gives the same ones."""
from __future__ import annotations

import functools

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends
from speccascade_fast.backends import keep_bounds
from speccascade_fast.probs import scaled
from speccascade_fast.truncation import (
    keep_bounds_torch,
    keep_mask,
    torch_keep_bounds,
    torch_keep_bounds_ragged,
    with_min_p,
)

from .helpers import NoHostReads
from .helpers import truncation_case as _case

IMPLS = {"torch": keep_bounds_torch, "cpu_op": keep_bounds,  # the dispatch: the C++ op on CPU
         "sorted": functools.partial(keep_bounds_torch, sync_free=True)}


def _kept_by_reference(x, T, top_k, top_p):
    """The reference's support among the tokens of nonzero untruncated probability (a token of
    probability 0 has law 0 kept or not)."""
    ref = scaled(x, T.double(), top_k, top_p) > 0
    alive = scaled(x, T.double(), None, None) > 0
    return ref, alive


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("trial", range(60))
def test_bounds_give_the_reference_support(trial, impl):
    x, T, top_k, top_p = _case(trial)
    bounds = IMPLS[impl](x, T, top_k, top_p)
    assert bounds.shape == (4, 2) and bounds.dtype == torch.float64
    mask = keep_mask(x, bounds)
    ref, alive = _kept_by_reference(x, T, top_k, top_p)
    assert bool(mask[0].all())  # T = 0: keep all (the one-hot ignores truncation)
    assert torch.equal(mask[1:] & alive[1:], ref[1:])


@pytest.mark.parametrize("trial", range(80))
def test_min_p_bounds_give_the_reference_support(trial):
    """top-k / top-p's bounds intersected with min-p's give the reference's support, which
    applies min-p last in probability space (HF's order), without host reads."""
    x, T, top_k, top_p = _case(3000 + trial)
    min_p = (0.01, 0.2, 0.7, 1.0)[trial % 4]
    base = keep_bounds_torch(x, T, top_k, top_p) if (top_k or top_p) else None
    with NoHostReads():
        bounds = with_min_p(base, x, T, min_p)
    mask = keep_mask(x, bounds)
    ref = scaled(x, T.double(), top_k, top_p, min_p) > 0
    alive = scaled(x, T.double(), None, None) > 0
    assert bool(mask[0].all())  # T = 0: keep all
    assert torch.equal(mask[1:] & alive[1:], ref[1:]), (trial, top_k, top_p, min_p)
    assert with_min_p(base, x, T, None) is base


def test_min_p_bound_is_exact_for_fp32_logits_at_the_boundary():
    """A logit one fp32 step below max + T log(min_p): the bound rounded to fp32 (as the kernels
    hold it) must still drop it, and the kernels must never draw it."""
    import math

    b = torch.tensor(math.log(0.3), dtype=torch.float64)  # the bound of a row whose max is 0
    near, inf = b.float(), torch.tensor(math.inf)
    above = near if near.double() >= b else torch.nextafter(near, inf)  # smallest fp32 >= b
    below = torch.nextafter(above, -inf)  # largest fp32 < b
    assert below.double() < b <= above.double()
    x = torch.stack([torch.tensor(0.0), below, above])[None].repeat(4000, 1)
    T = torch.ones(4000)
    bounds = with_min_p(None, x, T, 0.3)
    assert keep_mask(x[:1], bounds[:1]).tolist() == [[True, False, True]]
    assert torch.equal(keep_mask(x[:1], bounds[:1]), scaled(x[:1], T[:1].double(), None, None, 0.3) > 0)
    drawn = sc.sample(x, temperature=T, seed=torch.arange(4000), min_p=0.3)
    assert 1 not in drawn.tolist() and 2 in drawn.tolist()


@pytest.mark.parametrize("T", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("top_k,top_p", [(None, None), (20, None), (None, 0.8), (30, 0.9)])
def test_reference_min_p_is_hfs_order(T, min_p, top_k, top_p):
    """The reference's truncation is Hugging Face's warpers in HF's order: temperature, top-k,
    top-p, min-p."""
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(int(T * 10 + min_p * 100))
    logits = torch.randn(4, 50, generator=g, dtype=torch.float64) * 3
    scores = logits / T
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    hf = torch.softmax(MinPLogitsWarper(min_p)(None, scores), -1)
    ours = scaled(logits, torch.tensor(T, dtype=torch.float64), top_k, top_p, min_p)
    assert torch.allclose(ours, hf, atol=1e-12)


def test_the_cpu_op_equals_the_torch_bounds():
    """Bit for bit on 400 random cases (fp32 exp vs fp64 could differ only at a mass within
    ~1e-7 of top_p; the op must be the one the dispatch picks on CPU)."""
    import speccascade_fast._C  # noqa: F401

    for trial in range(400):
        x, T, top_k, top_p = _case(1000 + trial)
        assert backends.resolve("auto", x.device, "keep_bounds", logits=(x,),
                                top_p=top_p) == "cpu"
        a = keep_bounds_torch(x, T, top_k, top_p)
        b = torch.ops.speccascade.keep_bounds(x, T.double(), top_k, top_p)
        assert torch.equal(a, b), (trial, top_k, top_p, a, b)
        assert torch.equal(keep_bounds(x, T, top_k, top_p), b)


def test_the_sync_free_bounds_equal_the_windowed_ones_without_host_reads():
    """What CUDA runs (one full sort per row) against the windowed walk (the CPU's), bit
    for bit, on 200 random cases; and no op of it reads the device from the host."""
    for trial in range(200):
        x, T, top_k, top_p = _case(2000 + trial)
        want = keep_bounds_torch(x, T, top_k, top_p)
        with NoHostReads():
            got = keep_bounds_torch(x, T, top_k, top_p, sync_free=True)
        assert torch.equal(got, want), (trial, top_k, top_p)
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        keep_bounds_torch(x, T, None, 0.9)  # the windowed walk sizes its windows on the host


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ties_at_the_boundary(impl):
    keep_bounds = IMPLS[impl]
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0]])
    T = torch.tensor([1.0])
    # top-k keeps every token tied with the k-th largest (as Hugging Face does)
    assert keep_mask(x, keep_bounds(x, T, 3, None)).tolist() == [[0, 1, 1, 1, 1, 1]]
    # top-p walks ties by lower id: 3.0 (id 1), 3.0 (id 3), 2.0 (id 2), ...
    p = torch.softmax(x.double(), -1)[0]
    top_p = float(p[1] + p[3]) + 1e-9  # needs one of the 2.0s: the lowest id, 2
    assert keep_mask(x, keep_bounds(x, T, None, top_p)).tolist() == [[0, 1, 1, 1, 0, 0]]
    assert keep_bounds(x, T, None, top_p)[0].tolist() == [2.0, 2.0]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_no_truncation_and_shapes(impl):
    x = torch.randn(2, 3, 50)
    b = IMPLS[impl](x, torch.tensor([0.5, 1.0])[:, None], None, None)
    assert b.shape == (2, 3, 2)
    assert bool((b[..., 0] == -torch.inf).all()) and bool((b[..., 1] == 49).all())


def test_torch_bounds_of_parts_and_of_the_flattened_layout():
    """What a fused backend called without bounds uses: the torch bounds of each part (None
    without truncation), and for vLLM's layout each row with its request's temperature."""
    g = torch.Generator().manual_seed(3)
    q, p = torch.randn(5, 40, generator=g), torch.randn(7, 40, generator=g)
    T = torch.tensor([0.5, 1.5], dtype=torch.float64)
    assert torch_keep_bounds(None, None, (q, T[0]), None) == (None, None)
    a, none = torch_keep_bounds(6, 0.8, (q, T[0]), None)
    assert none is None and torch.equal(a, keep_bounds_torch(q, T[0], 6, 0.8))
    cu = torch.tensor([0, 2, 5])  # gamma 2 and 3: draft rows 0-1 / 2-4, target rows 0-2 / 3-6
    assert torch_keep_bounds_ragged(q, p, None, cu, T, None, None) == (None, None, None)
    kd, kt, kb = torch_keep_bounds_ragged(q, p, p[:2], cu, T, 6, 0.8)
    t_draft = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.5], dtype=torch.float64)
    t_target = torch.tensor([0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5], dtype=torch.float64)
    assert torch.equal(kd, keep_bounds_torch(q, t_draft, 6, 0.8))
    assert torch.equal(kt, keep_bounds_torch(p, t_target, 6, 0.8))
    assert torch.equal(kb, keep_bounds_torch(p[:2], T, 6, 0.8))
    assert torch.equal(kd, backends.ragged_keep_bounds(q, p, p[:2], cu, T, 6, 0.8)[0])


def test_the_op_rejects_malformed_bounds():
    import speccascade_fast._C  # noqa: F401  (registers the op; built by the install)

    q, p = torch.randn(1, 3, 10), torch.randn(1, 3, 10)
    x = torch.zeros(1, 2, dtype=torch.int64)
    per = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
           torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="draft_keep must be a contiguous CPU float64"):
        torch.ops.speccascade.verify_padded(q, x, p, *per, 0, torch.zeros(1, 2, 2), None)
    with pytest.raises(RuntimeError, match="target_keep"):
        torch.ops.speccascade.verify_padded(q, x, p, *per, 0, None,
                                            torch.zeros(1, 2, 2, dtype=torch.float64))
    t = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        torch.ops.speccascade.keep_bounds(q[0], t, 11, None)
    with pytest.raises(RuntimeError, match="top_p must be in"):
        torch.ops.speccascade.keep_bounds(q[0], t, None, 0.0)
    with pytest.raises(RuntimeError, match="temperature must be"):
        torch.ops.speccascade.keep_bounds(q[0], t[:2], 3, None)


def test_verify_with_truncation_matches_on_every_backend_here():
    """The public entry: ``verify(..., top_k, top_p)`` on ``cpu`` equals ``reference``."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 300, generator=g) * 3
    p = q + torch.randn(2, 4, 300, generator=g)
    x = sc.sample(q[:, :3], temperature=0.9, top_k=20, top_p=0.8, seed=torch.tensor([1, 2]))
    for rule, alpha in (("token_v3", 0.3), ("opt", 0.5), ("lossy_star", 0.4)):
        args = dict(rule=rule, alpha=alpha, temperature=0.9, top_k=20, top_p=0.8,
                    seed=torch.tensor([1, 2]))
        a = sc.verify(q, x, p, backend="reference", **args)
        b = sc.verify(q, x, p, backend="cpu", **args)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.deferred, b.deferred)
