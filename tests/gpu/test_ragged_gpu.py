"""vLLM's flattened layout (`verify_ragged`) on a GPU, both fused GPU backends (`triton`, `cuda`).

Eight requests of gamma 1..8 at the Qwen vocabulary (V = 151,936), bf16 logits, mixed T per
request (greedy rows included):

* every rule, both bonus modes: one fused call equals the reference (each request's own padded
  block), up to a genuine floating-point near-tie of one request's own block;
* top-k / top-p (per-row keep bounds of the flattened rows, the bonus rows' own);
* `cuda` only, with vLLM's `max_spec_len`: the op reads nothing on the host, so it is captured in
  a CUDA graph and replayed with other per-request gammas (same N and B): bit-identical to the
  eager call on those inputs, `max_spec_len + 1` columns wide;
* `cuda` only: the ragged kernel reads the same rows as the padded one, so each request's
  tokens, num_accepted and deferred are bit-identical to `verify(backend="cuda")` on that request
  alone, including a bonus tensor of another dtype than the draft rows; and its padding is
  -1 / False past gamma_b + 1.
"""

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast.ragged import verify_ragged

from ..helpers import capture, near_tie, verify_args
from .helpers import ALPHA, llm_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
GAMMAS = [1, 5, 3, 8, 2, 5, 1, 4]  # eight requests, gamma 1..8
TEMPS = [0.0, 0.8, 1.0, 0.8, 0.0, 1.3, 0.8, 1.0]
BACKENDS = ["triton", "cuda"]


def ragged_block(seed, *, T, cascade, bonus_dtype=None, gammas=GAMMAS):
    """One padded LLM-like block of the longest gamma, and the requests' blocks in the flattened
    layout (request b keeps its first gamma_b drafts)."""
    q, x, p = llm_block(len(gammas), seed, T=T, gamma=max(gammas))
    bonus = torch.stack([q[b, g] for b, g in enumerate(gammas)]) if cascade else None
    flat = dict(
        draft_logits=torch.cat([q[b, :g] for b, g in enumerate(gammas)]),
        draft_tokens=torch.cat([x[b, :g] for b, g in enumerate(gammas)]),
        target_logits=torch.cat([p[b, :g + 1] for b, g in enumerate(gammas)]),
        cu_num_draft_tokens=torch.tensor([0, *torch.tensor(gammas).cumsum(0).tolist()],
                                         device=DEV),
        bonus_draft_logits=bonus if bonus is None or bonus_dtype is None else bonus.to(bonus_dtype),
    )
    return (q, x, p), flat


def per_request_kwargs(rule, seed):
    B = len(GAMMAS)
    return dict(rule=rule, alpha=ALPHA[rule],
                temperature=torch.tensor(TEMPS, dtype=torch.float64, device=DEV),
                seed=torch.arange(B, device=DEV) + seed,
                positions=torch.arange(B, device=DEV) * 1000 + 17)


def available(backend):
    from speccascade_fast import backends

    if backend not in backends.available(torch.device(DEV)):
        pytest.fail(f"backend {backend!r} is not available on this GPU machine "
                    "(triton not importable, or speccascade_fast._C built without CUDA)")


@pytest.mark.parametrize("cascade", [True, False])
@pytest.mark.parametrize("rule", sc.RULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_layout_qwen_vocabulary(backend, rule, cascade):
    """One fused call equals the reference; a request may differ only at a genuine floating-point
    near-tie of its own block."""
    available(backend)
    seed = 300 + sc.RULES.index(rule)
    (q, x, p), flat = ragged_block(seed, T=0.8, cascade=cascade)
    kw = per_request_kwargs(rule, seed)
    got = verify_ragged(**flat, backend=backend, **kw)
    want = verify_ragged(**flat, backend="reference", **kw)
    B = len(GAMMAS)
    differ = [b for b in range(B)
              if not all(torch.equal(u[b], v[b]) for u, v in zip(got[:4], want[:4]))]
    assert len(differ) <= 1, (backend, rule, differ)
    for b in differ:  # request b's own block, as verify sees it
        g = GAMMAS[b]
        one = verify_args(rule, ALPHA[rule], TEMPS[b], 1, 0, DEV)
        one.update(seed=kw["seed"][b:b + 1], positions=kw["positions"][b:b + 1])
        qb = q[b:b + 1, :g + 1] if cascade else q[b:b + 1, :g]
        assert near_tie(qb, x[b:b + 1, :g], p[b:b + 1, :g + 1], one, 0, trials=8), (rule, b)


@pytest.mark.parametrize("trunc", [(50, None), (None, 0.9)])
@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3", "lossy", "lossy_star"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_top_k_top_p(backend, rule, trunc):
    """Keep bounds of the flattened rows (each with its request's T) and of the bonus rows."""
    available(backend)
    top_k, top_p = trunc
    seed = 500 + sc.RULES.index(rule)
    _, flat = ragged_block(seed, T=0.8, cascade=True)
    kw = per_request_kwargs(rule, seed)
    got = verify_ragged(**flat, backend=backend, top_k=top_k, top_p=top_p, **kw)
    want = verify_ragged(**flat, backend="reference", top_k=top_k, top_p=top_p, **kw)
    bad = [name for name, a, b in zip(want._fields[:4], got, want) if not torch.equal(a, b)]
    assert not bad, (backend, rule, trunc, bad)


@pytest.mark.parametrize("bonus_dtype", [None, torch.float32])
@pytest.mark.parametrize("rule", ["spec", "chow", "opt", "token_v3", "lossy", "lossy_star", "bild"])
def test_cuda_ragged_equals_cuda_padded_per_request(rule, bonus_dtype):
    """The ragged kernel is the padded kernel reading other addresses: bit-identical outputs, and
    -1 / False padding past each request's gamma_b + 1 columns."""
    available("cuda")
    seed = 700 + sc.RULES.index(rule)
    (q, x, p), flat = ragged_block(seed, T=0.8, cascade=True, bonus_dtype=bonus_dtype)
    kw = per_request_kwargs(rule, seed)
    got = verify_ragged(**flat, backend="cuda", **kw)
    assert got.tokens.shape == (len(GAMMAS), max(GAMMAS) + 1)
    for b, g in enumerate(GAMMAS):
        qb = q[b:b + 1, :g + 1]
        if bonus_dtype is not None:  # the padded call needs one dtype: bf16 -> fp32 is exact
            qb = qb.to(bonus_dtype)
        one = sc.verify(qb, x[b:b + 1, :g], p[b:b + 1, :g + 1], rule=rule, alpha=ALPHA[rule],
                        temperature=kw["temperature"][b:b + 1], seed=kw["seed"][b:b + 1],
                        positions=kw["positions"][b:b + 1], backend="cuda")
        assert torch.equal(got.tokens[b, :g + 1], one.tokens[0]), (rule, b)
        assert torch.equal(got.deferred[b, :g + 1], one.deferred[0]), (rule, b)
        assert int(got.num_accepted[b]) == int(one.num_accepted[0]), (rule, b)
        assert (got.tokens[b, g + 1:] == -1).all() and not got.deferred[b, g + 1:].any(), (rule, b)


@pytest.mark.parametrize("cascade", [True, False])
def test_cuda_ragged_is_captured_with_max_spec_len(cascade):
    """``backends.cuda.verify_ragged(..., max_spec_len=K)`` inside a CUDA graph: replayed with
    the requests' gammas permuted (another cu, the same N and B) and new logits, it returns what
    the eager op returns for them (and the reference, up to a near-tie)."""
    available("cuda")
    from speccascade_fast.backends import cuda as cb

    K, B, rule = 10, len(GAMMAS), "token_v3"
    other = GAMMAS[::-1]  # same sum, other offsets
    _, flat = ragged_block(41, T=0.8, cascade=cascade)
    _, new = ragged_block(42, T=0.8, cascade=cascade, gammas=other)
    kw = per_request_kwargs(rule, 41)
    kw["alpha"] = torch.full((B,), ALPHA[rule], dtype=torch.float64, device=DEV)
    names = [k for k in flat if flat[k] is not None]
    static = {k: flat[k].clone() for k in names}

    def run():
        return cb.verify_ragged(*(static.get(k) for k in (
            "draft_logits", "draft_tokens", "target_logits", "cu_num_draft_tokens",
            "bonus_draft_logits")), max_spec_len=K, **kw)

    graph, out = capture(run)
    for k in names:
        static[k].copy_(new[k])
    graph.replay()
    torch.cuda.synchronize()
    eager = run()
    assert out.tokens.shape == (B, K + 1)
    assert all(torch.equal(u, v) for u, v in zip(out[:4], eager[:4]))
    for b, g in enumerate(other):
        assert bool((out.tokens[b, g + 1:] == -1).all()) and not bool(out.deferred[b, g + 1:].any())
    want = verify_ragged(**new, backend="reference", max_spec_len=K, **kw)
    differ = [b for b in range(B) if not torch.equal(out.tokens[b], want.tokens[b])]
    assert len(differ) <= 1, differ  # (a genuine floating-point near-tie at most)
