"""Shared test helpers: example logits, closed forms and a chi-squared check; tiny model pairs,
prompts and ragged (flattened) verification inputs used by several test modules."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from speccascade_fast import sample as sc_sample

# a lenience per rule for generic tests (inside each rule's range, not at an extreme)
ALPHAS = {
    "spec": [None], "drafter": [None],
    "chow": [0.2, 0.6], "chow_log": [0.5, 1.2], "diff": [-0.2, 0.1], "diff_log": [-0.3, 0.2],
    "opt": [-1.0, 0.5], "opt_log": [-1.0, 0.5], "token_v1": [-0.1, 0.2], "token_v2": [0.1, 0.4],
    "token_v3": [0.2, 0.6], "lossy": [0.2, 0.5], "lossy_star": [0.2, 0.5], "bild": [0.8, 2.0],
    "ensemble": [0.3, 0.8],
}


def logits_pair(V: int, seed: int, rows: int = 1, sharp: float = 1.5):
    """Drafter/verifier logits that agree partly (as real pairs do)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(rows, V, generator=g, dtype=torch.float64) * sharp
    q = shared + 0.8 * torch.randn(rows, V, generator=g, dtype=torch.float64)
    p = shared + 0.8 * torch.randn(rows, V, generator=g, dtype=torch.float64)
    return q, p


def chi2_pvalue(tokens: torch.Tensor, law: torch.Tensor) -> float:
    """Goodness of fit of emitted ``tokens`` against ``law`` ``[V]``. Tokens where the law is 0
    must never appear (asserted); bins with expected count < 5 are pooled."""
    V = law.numel()
    counts = torch.bincount(tokens, minlength=V).double().numpy()
    law = law.double().numpy()
    n = counts.sum()
    assert counts[law <= 0].sum() == 0, f"emitted a token with zero probability: {counts}, {law}"
    exp = law * n
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big & (law > 0)).any():
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    if len(obs_b) < 2:
        return 1.0
    exp_b = np.array(exp_b) * (sum(obs_b) / sum(exp_b))
    return float(stats.chisquare(obs_b, exp_b).pvalue)


def softmax(x, t=1.0):
    x = np.asarray(x, dtype=np.float64) / t
    e = np.exp(x - x.max())
    return e / e.sum()


def closed_form(rule, alpha, q_logits, p_logits, T):
    """pi for one position from SEMANTICS §3, written independently of the package (numpy)."""
    ql = np.asarray(q_logits, dtype=np.float64)
    pl = np.asarray(p_logits, dtype=np.float64)
    q1, p1 = softmax(ql), softmax(pl)
    if T == 0:
        qT = np.eye(len(ql))[int(np.argmax(ql))]
        pT = np.eye(len(pl))[int(np.argmax(pl))]
    else:
        qT, pT = softmax(ql, T), softmax(pl, T)

    def ent(d):
        return -sum(x * math.log(x) for x in d if x > 0)

    tv = np.clip(pT - qT, 0, None).sum()
    if rule == "spec":
        return pT
    if rule == "drafter":
        return qT
    if rule == "ensemble":
        if T == 0:  # HF's greedy path: the argmax of the unscaled mixture
            return np.eye(len(ql))[int(np.argmax(alpha * p1 + (1 - alpha) * q1))]
        return alpha * pT + (1 - alpha) * qT
    if rule in ("lossy", "lossy_star"):
        m = np.minimum(qT, pT / (1 - alpha))
        if rule == "lossy":
            r = np.clip(pT - qT, 0, None)
            return m + (1 - m.sum()) * (r / r.sum() if r.sum() > 0 else 0 * r)
        return None  # checked by its defining equation instead
    if rule.startswith("token"):
        if rule == "token_v1":
            a = q1 >= p1.max() - alpha
        elif rule == "token_v2":
            a = p1 >= p1.max() - alpha
        else:
            a = p1 >= (1 - alpha) * p1.max()
        eta = qT[~a].sum()
        return qT * a + eta * pT
    if rule == "chow":
        d = q1.max() < 1 - alpha
    elif rule == "chow_log":
        d = ent(q1) > alpha
    elif rule == "diff":
        d = q1.max() < p1.max() - alpha
    elif rule == "diff_log":
        d = -ent(q1) < -ent(p1) - alpha
    elif rule == "opt":
        d = q1.max() < p1.max() - alpha * tv
    elif rule == "opt_log":
        d = -ent(q1) < -ent(p1) - alpha * tv
    elif rule == "bild":
        D = -math.log(p1[int(np.argmax(q1))]) if T == 0 else -(q1 * np.log(p1)).sum()
        d = D > alpha
    else:
        raise AssertionError(rule)
    return pT if d else qT


def near_tie(q, x, p, args, row, trials=16) -> bool:
    """Does a 1e-6 relative perturbation of the logits change the reference's output at ``row``?
    ``args``: the normalised keyword arguments of a backend's ``verify`` (no top-k/top-p)."""
    from speccascade_fast.backends import reference

    base = reference.verify(q, x, p, top_k=None, top_p=None, **args)
    g = torch.Generator().manual_seed(row)
    for _ in range(trials):
        qq = q.double() * (1 + 1e-6 * torch.randn(q.shape, generator=g, dtype=torch.float64).to(
            q.device))
        pp = p.double() * (1 + 1e-6 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(
            p.device))
        out = reference.verify(qq, x, pp, top_k=None, top_p=None, **args)
        if any(not torch.equal(a[row], b[row]) for a, b in zip(out[:4], base[:4])):
            return True
    return False


def assert_same_up_to_near_ties(got, want, q, x, p, args, who="triton", trials=16):
    """``got`` (a fast backend's VerifyOutput) equals the reference's ``want`` row for row; a row
    may differ only at a genuine floating-point near-tie (:func:`near_tie`), at most one per call."""
    import warnings

    # (fields that both leave None, e.g. ``spent`` without a divergence budget, are skipped)
    fields = [(n, a, b) for n, a, b in zip(want._fields, got, want) if a is not None or b is not None]
    bad = sorted({int(r) for _, a, b in fields for r in torch.nonzero(
        (a != b).reshape(a.shape[0], -1).any(1)).flatten()})
    for row in bad:
        detail = {n: (a[row].tolist(), b[row].tolist()) for n, a, b in fields}
        assert near_tie(q, x, p, args, row, trials), f"row {row} differs ({who}, reference): {detail}"
        warnings.warn(f"floating-point near-tie allowed at row {row}: {detail}", stacklevel=2)
    assert len(bad) <= 1, f"{len(bad)} near-ties in one call is implausible: rows {bad}"


def llm_block(B, V, seed, *, gamma, T=0.8, cascade=True, dtype=torch.bfloat16, mask=False,
              device="cpu"):
    """LLM-like logits on ``device`` (a broad bulk plus a few likely tokens that both models
    partly share), ``[B, gamma + 1, V]`` per model (the drafter's ``[B, gamma, V]`` without
    ``cascade``), and drafts drawn from the drafter's qT at ``T``. ``mask``: 15 % of the tokens
    at -inf in each model (never token 0, so every row keeps a finite logit)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (B, gamma + 1, V)
    shared = torch.randn(shape, generator=g, device=device) * 2.5
    top = torch.randint(0, V, (B, gamma + 1, min(16, V)), generator=g, device=device)
    shared.scatter_add_(-1, top, torch.full(top.shape, 9.0, device=device))
    q = shared + torch.randn(shape, generator=g, device=device)
    p = shared + torch.randn(shape, generator=g, device=device)
    if mask:
        for x in (q, p):
            m = torch.rand(shape, generator=g, device=device) < 0.15
            m[..., 0] = False
            x.masked_fill_(m, float("-inf"))
    q, p = q.to(dtype), p.to(dtype)
    temps = torch.as_tensor(T, dtype=torch.float64, device=device).expand(B)
    x = sc_sample(q[:, :gamma], temperature=temps, seed=torch.arange(B, device=device) + seed)
    return (q if cascade else q[:, :gamma].contiguous()), x, p


def noisy_drafter(verifier, seed: int, noise: float):
    """A drafter for ``verifier``: a copy whose LM head gets Gaussian noise (``noise`` x the head's
    std, drawn with ``seed``), so the pair agrees often but not always."""
    import copy

    drafter = copy.deepcopy(verifier)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = drafter.lm_head.weight
        w.add_(torch.randn(w.shape, generator=g) * noise * w.std())
    return drafter


def capture(run):
    """``run()`` captured once in a CUDA graph by the engine's own helper
    (:func:`speccascade_fast.graphs.capture`): ``(graph, the captured call's static output)``."""
    from speccascade_fast.graphs import capture as engine_capture

    return engine_capture(run)


def graph_replay_check(run, q, x, p, args, new_inputs, reference_verify, **compare):
    """CUDA-graph safety of a verification call ``run()`` reading ``q, x, p, args``: captured
    once, its replay equals the eager call; then with ``new_inputs = (q2, x2, p2)`` copied into
    the captured buffers (and new seeds / positions) the replay equals ``reference_verify``'s
    answer for them, up to near-ties (``compare``: passed to assert_same_up_to_near_ties)."""
    eager = run()
    graph, static_out = capture(run)
    graph.replay()
    torch.cuda.synchronize()
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(static_out, eager))

    for buf, new in zip((q, x, p), new_inputs):
        buf.copy_(new)
    args["seed"].add_(1000)
    args["positions"].add_(5)
    graph.replay()
    torch.cuda.synchronize()
    want = reference_verify(q, x, p, top_k=None, top_p=None, **args)
    assert_same_up_to_near_ties(static_out, want, q, x, p, args, **compare)


def verify_args(rule, alpha, T, B, seed, device):
    """Per-row keyword arguments of a backend's ``verify`` (validated, normalised ``[B]``
    tensors on ``device``): alpha and T broadcast, distinct seeds and positions per row."""
    from speccascade_fast import checks

    return dict(
        rule=rule,
        alpha=checks.alpha_tensor(alpha, (B,), device).contiguous(),
        temperature=checks.temperature(torch.as_tensor(T, dtype=torch.float64), (B,),
                                       device).contiguous(),
        seed=torch.arange(B, dtype=torch.int64, device=device) * 31 + seed,
        positions=torch.arange(B, dtype=torch.int64, device=device) * 17 + 1000,
    )


#: ops that copy a device value to the host (or size an output by one)
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static",
              "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
              "aten::unique_consecutive", "aten::masked_select", "aten::is_nonzero",
              "aten::equal", "aten::allclose", "aten::_assert_async"}


def truncation_case(trial, max_vocab=3000):
    """Random rows for the keep-bound tests: (logits [4, V], T [4] (0, 0.3, 1, 2.5), top_k,
    top_p), with many ties every third trial, every third token masked every fourth, fp32 / bf16 /
    fp16 in turn, top_k or top_p off in some trials."""
    g = torch.Generator().manual_seed(trial)
    V = int(torch.randint(2, max_vocab, (), generator=g))
    x = torch.randn(4, V, generator=g) * float(torch.rand((), generator=g) * 8 + 0.1)
    if trial % 3 == 0:  # many ties
        x = (x * 2).round() / 2
    if trial % 4 == 1:
        x[:, ::3] = float("-inf")
    x = x.to((torch.float32, torch.bfloat16, torch.float16)[trial % 3])
    T = torch.tensor([0.0, 0.3, 1.0, 2.5])
    top_k = None if trial % 4 == 0 else int(torch.randint(1, V + 1, (), generator=g))
    top_p = None if trial % 4 == 3 else float(torch.rand((), generator=g) * 0.98 + 0.01)
    return x, T, top_k, top_p


class NoHostReads(TorchDispatchMode):
    """Raise on any op that reads the device from the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in HOST_READS:
            raise AssertionError(f"host read inside a graph body: {name}")
        if name in ("aten::index", "aten::index_put", "aten::index_put_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"boolean-mask indexing (a host read) in a graph body: {name}")
        return func(*args, **kwargs)


def assert_graph_stats(graphs: dict, eager: dict, kw: dict) -> None:
    """The statistics of an Engine run on its CUDA graphs (or the graphs' fixed-shape bodies)
    against the eager run, Engine settings ``kw``: the same counts, but for the drafter calls
    under ``bonus="cascade"`` (rules other than ``spec``): the graphs run the bonus drafter
    step in every block, the eager blocks only where a row accepted all its drafts. Blocks cut
    by ``draft_confidence`` run it only where it is used either way."""
    for k in ("tokens", "verifier_calls", "accepted", "deferred", "blocks"):
        assert graphs[k] == eager[k], k
    blocks = kw.get("method", "spec_cascade") == "spec_cascade" and not kw.get(
        "draft_confidence")
    if blocks and kw.get("bonus", "cascade") == "cascade" and kw["rule"] != "spec":
        assert graphs["drafter_calls"] == (kw.get("gamma", 5) + 1) * graphs["blocks"]
        assert eager["drafter_calls"] < graphs["drafter_calls"]
    else:
        assert graphs["drafter_calls"] == eager["drafter_calls"]


def tiny_pair(V=64, seed=0, init=0.3, noise=0.6, layers=2, hidden=32, max_pos=256):
    """``(drafter, verifier)``: fp32 random Llamas; the drafter's LM head is the verifier's plus
    Gaussian noise (``noise`` x its std) drawn with another seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
        initializer_range=init, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    verifier = LlamaForCausalLM(cfg).eval()
    return noisy_drafter(verifier, seed + 1000, noise), verifier


def noisy_copy_pair(cls, cfg):
    """``(drafter, verifier)``: a random ``cls(cfg)`` verifier (torch seed 3) and its
    :func:`noisy_drafter` (seed 4, noise 0.6)."""
    torch.manual_seed(3)
    verifier = cls(cfg).eval()
    return noisy_drafter(verifier, seed=4, noise=0.6), verifier


def qwen2_pair():
    """A tiny Qwen2 pair (V = 64) with sliding-window layers (window 4, one full layer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_sliding_window=True, sliding_window=4, max_window_layers=1,
                      initializer_range=0.3)
    return noisy_copy_pair(Qwen2ForCausalLM, cfg)


#: prompts of different lengths, left-padded with PAD into one batch
PROMPTS = [[3, 5, 7, 9], [1, 2], [10, 20, 30, 40, 50, 60, 11]]
PAD = 0


def left_padded(prompts, pad=PAD):
    """``(input_ids, attention_mask)`` of ``prompts`` left-padded with ``pad``."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


#: the requests' gammas of :func:`ragged_inputs` by default
RAGGED_GAMMAS = [1, 4, 2]


def ragged_inputs(V=64, dtype=torch.float32, seed=0, T=1.0, gammas=RAGGED_GAMMAS):
    """Per request b: draft logits [gamma_b + 1, V] (last row: the bonus position), target
    logits [gamma_b + 1, V], drafts from qT; and the same data flattened."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b, gamma in enumerate(gammas):
        q = torch.randn(gamma + 1, V, generator=g) * 2
        p = q + torch.randn(gamma + 1, V, generator=g)
        q, p = q.to(dtype), p.to(dtype)
        x = sc_sample(q[None, :gamma], temperature=T, seed=100 + b)[0]
        blocks.append((q, x, p))
    cu = torch.tensor([0] + torch.tensor(gammas).cumsum(0).tolist())
    flat = dict(
        draft_logits=torch.cat([q[:-1] for q, _, _ in blocks]),
        draft_tokens=torch.cat([x for _, x, _ in blocks]),
        target_logits=torch.cat([p for _, _, p in blocks]),
        cu_num_draft_tokens=cu,
        bonus_draft_logits=torch.stack([q[-1] for q, _, _ in blocks]),
    )
    return blocks, flat
