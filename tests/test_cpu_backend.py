"""The fused CPU backend (csrc/cpu/verify_cpu.cpp) against the reference backend.

Tokens, num_accepted and deferred must be *identical* to the reference's. The kernel sums softmax
terms of a fp32 exp in fp64 (relative error ~1e-7), so a decision can only differ at a genuine
floating-point near-tie: a uniform within ~1e-7 of an acceptance ratio, two race scores within
~1e-7, or a deferral statistic within ~1e-7 of its threshold. The random inputs below hit none
(none of the ~10^4 cases tried while writing the kernel did); `test_near_tie_*` builds one on
purpose and pins down how close it has to be.

The op must exist: this suite runs after `pip install --no-build-isolation -e .`, and a missing
extension fails here instead of being skipped.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import _ext, backends, rng
from speccascade_fast.backends import cpu
from speccascade_fast.rules import FUSED_RULES  # the rules the kernels implement

from .helpers import ALPHAS, chi2_pvalue, logits_pair

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one intra-op thread. On a shared 2-core machine every OpenMP region of the float64
    reference's torch ops can wait a scheduler time slice for a descheduled thread, which made
    this suite's wall time erratic (10 s to 4 min). The kernel's results do not depend on the
    thread count (fixed 16384-wide chunks, merged in order):
    `test_results_do_not_depend_on_the_thread_count` checks that with two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_block(B, gamma, V, dtype, seed, *, T=1.0, mask=False, sharp=2.0):
    """Partly agreeing drafter/verifier logits, drafts drawn from the drafter's qT; with
    ``mask`` about 15 % of each model's tokens are -inf (the drafts never hit a masked token,
    as they are drawn from qT)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(B, gamma + 1, V, generator=g) * sharp
    q = shared + 0.8 * torch.randn(B, gamma + 1, V, generator=g)
    p = shared + 0.8 * torch.randn(B, gamma + 1, V, generator=g)
    if mask:
        for x, keep in ((q, 0), (p, 1)):
            m = torch.rand(B, gamma + 1, V, generator=g) < 0.15
            m[..., keep] = False  # every row keeps a finite logit
            x.masked_fill_(m, float("-inf"))
    q, p = q.to(dtype), p.to(dtype)
    x = sc.sample(q[:, :gamma], temperature=T, seed=torch.arange(B) + 1000 * seed,
                  positions=torch.arange(B) * 3)
    return q, x, p


def assert_same(q, x, p, *, rule, alpha, T, bonus="cascade", seed=None, positions=None, **kw):
    B, gamma = x.shape
    seed = torch.arange(B) * 7 + 1 if seed is None else seed
    positions = torch.arange(B) * 5 + 2 if positions is None else positions
    dq = q if bonus == "cascade" else q[:, :gamma]
    args = dict(rule=rule, alpha=alpha, temperature=T, seed=seed, positions=positions, **kw)
    ref = sc.verify(dq, x, p, backend="reference", **args)
    out = sc.verify(dq, x, p, backend="cpu", **args)
    what = f"{rule} alpha={alpha} T={T} {tuple(p.shape)} {p.dtype} bonus={bonus}"
    assert torch.equal(out.tokens, ref.tokens), f"{what}\n{ref.tokens}\n{out.tokens}"
    assert torch.equal(out.num_accepted, ref.num_accepted), what
    assert torch.equal(out.num_emitted, ref.num_emitted), what
    assert torch.equal(out.deferred, ref.deferred), f"{what}\n{ref.deferred}\n{out.deferred}"
    return out


def test_the_op_is_built_and_is_the_cpu_default():
    assert _ext.load() is not None, f"speccascade_fast._C did not import: {_ext.IMPORT_ERROR}"
    assert cpu.is_available() and cpu.is_available("cpu")
    assert not cpu.is_available("meta")
    assert backends.available()[0] == "cpu", "auto must pick the fused kernel on CPU"
    assert torch.ops.speccascade.verify_padded is not None
    assert torch.ops.speccascade.verify_ragged is not None


# --- exact equality with the reference ---------------------------------------------------------
# V = 17: every dtype x B x gamma x bonus policy, masked on alternate cases; V = 1000: every dtype
# x bonus policy at B = 3, gamma = 4; V = 40000: two rotating combinations per (rule, T) (the
# float64 reference is the slow part).
def _grid(V, index):
    if V == 17:
        combos = list(itertools.product(DTYPES, (1, 3), (1, 4), ("cascade", "verifier")))
    elif V == 1000:
        combos = [(d, 3, 4, bonus) for d in DTYPES for bonus in ("cascade", "verifier")]
    else:  # two of the 24 combinations, rotating with (rule, T)
        combos = list(itertools.product(DTYPES, (1, 3), (1, 4), ("cascade", "verifier")))
        combos = [combos[(7 * index) % len(combos)], combos[(7 * index + 11) % len(combos)]]
    return combos


@pytest.mark.parametrize("V", [17, 1000, 40000])
@pytest.mark.parametrize("T", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_equals_reference(rule, T, V):
    index = sc.RULES.index(rule) * 3 + int(T * 10)
    for k, (dt, B, gamma, bonus) in enumerate(_grid(V, index)):
        seed = 100 * index + k
        q, x, p = make_block(B, gamma, V, DTYPES[dt], seed, T=T, mask=(k + index) % 2 == 1)
        alpha = ALPHAS[rule][k % len(ALPHAS[rule])]
        assert_same(q, x, p, rule=rule, alpha=alpha, T=T, bonus=bonus)


# Each rule's extreme lenience (SEMANTICS §4: the alphas giving spec or drafter exactly) and
# degenerate inputs where the reference's fp64 arithmetic gives exact zeros: identical rows
# (TV = 0, residual = 0), very sharp rows (TV ~ 1e-12 multiplied by |alpha| = 1e6), tied logits
# (argmax ties), almost everything masked, drafts that are not drawn from qT (qT(x) = 0 < 1e-10).
EXTREME = {
    "spec": [None], "drafter": [None], "chow": [0.0, 1.0], "chow_log": [0.0, 50.0],
    "diff": [-1.0, 0.0, 1.0], "diff_log": [-50.0, 0.0, 50.0], "opt": [-1e6, 0.0, 1e6],
    "opt_log": [-1e6, 0.0, 1e6], "token_v1": [-1.0, 0.0, 1.0], "token_v2": [-1.0, 0.0, 1.0],
    "token_v3": [-0.5, 0.0, 1.0], "lossy": [0.0, 0.999], "lossy_star": [0.0, 0.999],
    "bild": [0.0, 100.0],
}
KINDS = ["identical", "sharp", "ties", "mostly_masked", "random_drafts"]


def _degenerate(kind, T, seed, B=3, gamma=3, V=300):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, gamma + 1, V, generator=g) * 2
    p = q + torch.randn(B, gamma + 1, V, generator=g)
    if kind == "identical":
        p = q.clone()
    elif kind == "sharp":
        q, p = q * 20, p * 20
    elif kind == "ties":
        q, p = q.round(), p.round()
    elif kind == "mostly_masked":
        for x, keep in ((q, slice(0, 3)), (p, slice(1, 4))):
            m = torch.rand(B, gamma + 1, V, generator=g) < 0.97
            m[..., keep] = False
            x.masked_fill_(m, float("-inf"))
    if kind == "random_drafts":
        x = torch.randint(0, V, (B, gamma), generator=g)
        q[0, 0, x[0, 0]] = float("-inf")  # one draft the drafter could never have drawn
    else:
        x = sc.sample(q[:, :gamma], temperature=T, seed=torch.arange(B) + seed)
    return q, x, p


def _residual_is_rounding(q, x, p, ref, out, *, rule, alpha, T, cascade) -> bool:
    """Whether every row where ``out`` and ``ref`` differ drew its last token from a residual
    that is zero up to rounding: the same accepted drafts, and the reference's residual at the
    rejected position sums to at most 1e-12 while the position's law is a distribution. There
    the reference races over fp64 rounding noise where the kernel's residual is exactly zero
    and falls back to the position's law (SEMANTICS: an all-zero residual comes only with
    acceptance probability 1; which side of zero the rounding lands on depends on the CPU's
    vector kernels), so the kernel's token must be in that law's support."""
    from speccascade_fast.rules import position_targets

    B, gamma = x.shape
    rows = gamma + 1 if cascade else gamma
    t = position_targets(q.double(), p[:, :rows].double(), rule=rule,
                         alpha=torch.full((B, rows), float(alpha) if alpha is not None else 0.0,
                                          dtype=torch.float64),
                         temperature=torch.full((B, rows), float(T), dtype=torch.float64),
                         top_k=None, top_p=None)
    for b in (ref.tokens != out.tokens).any(1).nonzero().flatten().tolist():
        j = int(ref.num_accepted[b])
        if j != int(out.num_accepted[b]) or j >= gamma or not torch.equal(
                ref.tokens[b, :j], out.tokens[b, :j]):
            return False
        if t.residual[b, j].sum() > 1e-12 or t.law[b, j, out.tokens[b, j]] <= 0:
            return False
    return True


@pytest.mark.parametrize("T", [0.0, 1e-3, 0.7, 50.0])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_equals_reference_at_extremes(rule, T):
    """Equal to the reference token for token, except where the rejected position's residual is
    zero up to rounding (see _residual_is_rounding): then the kernel's token is in the law's
    support."""
    for k, (alpha, kind) in enumerate(itertools.product(EXTREME[rule], KINDS)):
        q, x, p = _degenerate(kind, T, seed=k)
        bonus = "cascade" if k % 2 else "verifier"
        try:
            assert_same(q, x, p, rule=rule, alpha=alpha, T=T, bonus=bonus)
        except AssertionError:
            B, gamma = x.shape
            dq = q if bonus == "cascade" else q[:, :gamma]
            args = dict(rule=rule, alpha=alpha, temperature=T, seed=torch.arange(B) * 7 + 1,
                        positions=torch.arange(B) * 5 + 2)
            ref = sc.verify(dq, x, p, backend="reference", **args)
            out = sc.verify(dq, x, p, backend="cpu", **args)
            assert _residual_is_rounding(dq, x, p, ref, out, rule=rule, alpha=alpha, T=T,
                                         cascade=bonus == "cascade"), (rule, T, alpha, kind)


@pytest.mark.parametrize("rule", ["spec", "opt", "token_v1", "bild", "lossy_star", "diff_log"])
def test_vocabulary_split_into_chunks(rule):
    """V = 50000 spans four 16384-wide chunks: maxima, argmax ties and masked stretches across
    chunk boundaries merge exactly (online-softmax state merge)."""
    B, gamma, V = 2, 3, 50000
    g = torch.Generator().manual_seed(5)
    for layout in range(4):
        q = torch.randn(B, gamma + 1, V, generator=g) * 2
        p = q + torch.randn(B, gamma + 1, V, generator=g)
        if layout == 0:
            q[..., :20000] = float("-inf")  # q's first chunk entirely masked
        elif layout == 1:
            p[..., :33000] = float("-inf")
        elif layout == 2:  # the max in the last chunk, a near-max in the first
            q[..., 49990] += 15
            p[..., 49991] += 15
            p[..., 100] += 14.9
        else:
            q[..., 16384:32768] = float("-inf")
            p[..., :16384] = float("-inf")
            p[..., 40000:] = float("-inf")
        for T in (0.0, 0.8, 1.0):
            x = sc.sample(q[:, :gamma], temperature=T, seed=torch.arange(B) + 3)
            for alpha in ALPHAS[rule]:
                assert_same(q, x, p, rule=rule, alpha=alpha, T=T)


def test_results_do_not_depend_on_the_thread_count():
    B, gamma, V = 2, 5, 70000
    q, x, p = make_block(B, gamma, V, torch.bfloat16, seed=8)
    for rule in FUSED_RULES:
        kw = dict(rule=rule, alpha=ALPHAS[rule][-1], temperature=0.9, seed=torch.tensor([3, 4]))
        torch.set_num_threads(1)
        one = sc.verify(q, x, p, backend="cpu", **kw)
        torch.set_num_threads(2)
        two = sc.verify(q, x, p, backend="cpu", **kw)
        assert all(torch.equal(a, b) for a, b in zip(one[:4], two[:4])), rule
        assert one.spent is None and two.spent is None
    assert_same(q, x, p, rule="opt", alpha=0.5, T=0.9)  # and the parallel path is right


@pytest.mark.parametrize("rule", ["spec", "token_v3", "opt"])
def test_largest_vocabulary(rule):
    q, x, p = make_block(1, 2, 262144, torch.bfloat16, seed=3)
    assert_same(q, x, p, rule=rule, alpha=ALPHAS[rule][0], T=1.0)


def test_per_request_temperature_alpha_seed_and_mixed_greedy():
    """One batch mixing T = 0 and T > 0 rows, per-request alpha, seeds and positions
    (including negative seeds and large positions: the RNG works on the int64 bits)."""
    B, gamma, V = 5, 4, 500
    q, x, p = make_block(B, gamma, V, torch.float32, seed=11)
    T = torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0], dtype=torch.float64)
    x = torch.stack([sc.sample(q[b, :gamma], temperature=float(T[b]), seed=b) for b in range(B)])
    seed = torch.tensor([-(2**63), -1, 0, 2**62, 12345])
    positions = torch.tensor([0, 1, 2**40, 7, 2**33])
    for rule in FUSED_RULES:
        alpha = ALPHAS[rule][0]
        if alpha is not None:
            alpha = torch.linspace(0.5, 1.0, B, dtype=torch.float64) * alpha
        assert_same(q, x, p, rule=rule, alpha=alpha, T=T, seed=seed, positions=positions)


def test_strided_views_and_mixed_dtypes_are_read_in_place():
    B, gamma, V = 3, 3, 700
    g = torch.Generator().manual_seed(2)
    big = torch.randn(B, gamma + 4, V + 9, generator=g) * 2
    q = big[:, 1:gamma + 2, 4:V + 4]  # non-contiguous rows, unit stride along V
    p = (q.float() + torch.randn(B, gamma + 1, V, generator=g)).to(torch.bfloat16)
    assert not q.is_contiguous()
    x = sc.sample(q[:, :gamma], seed=torch.arange(B))
    for rule in ("spec", "opt_log", "token_v2", "lossy", "bild"):
        assert_same(q, x, p, rule=rule, alpha=ALPHAS[rule][-1], T=0.9)
    # a non-unit stride along V is copied once by the op, and still equal
    qt = big.transpose(1, 2).contiguous().transpose(1, 2)[:, :gamma + 1, :V]
    assert qt.stride(-1) != 1
    assert_same(qt, x, p, rule="diff", alpha=0.1, T=1.0)


# top-k / top-p reach the kernel as keep bounds (speccascade_fast/truncation.py). T = 1 matters
# on its own: truncation stops the kernel from reusing the unscaled sums as the scaled ones.
TRUNCATIONS = [{"top_k": 1}, {"top_k": 5}, {"top_p": 0.3}, {"top_p": 0.9},
               {"top_k": 7, "top_p": 0.8}, {"top_k": 10**6}]


@pytest.mark.parametrize("T", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_top_k_top_p_equal_reference(rule, T):
    index = sc.RULES.index(rule) * 3 + int(T * 10)
    for k, trunc in enumerate(TRUNCATIONS):
        V = (64, 1000, 40000)[(k + index) % 3]
        dt = list(DTYPES)[(k + index) % 3]
        trunc = {**trunc, "top_k": min(trunc["top_k"], V)} if "top_k" in trunc else trunc
        q, x, p = make_block(3, 4, V, DTYPES[dt], seed=900 + 10 * index + k, T=T,
                             mask=k % 2 == 1)
        if k % 3 == 2:  # ties at the truncation boundary: the cut id decides among them
            q, p = (q.float() * 2).round().to(q.dtype), (p.float() * 2).round().to(p.dtype)
        if k % 2 == 0:  # drafts from the truncated qT, as the engine draws them
            x = sc.sample(q[:, :4], temperature=T, seed=torch.arange(3) + k, **trunc)
        alpha = ALPHAS[rule][k % len(ALPHAS[rule])]
        bonus = "cascade" if k % 2 else "verifier"
        assert_same(q, x, p, rule=rule, alpha=alpha, T=T, bonus=bonus, **trunc)


def test_top_k_top_p_mixed_temperatures_and_degenerate_rows():
    """Per-request T with greedy rows among sampled ones, tied and mostly masked rows."""
    for k, (kind, trunc) in enumerate(itertools.product(KINDS, TRUNCATIONS[1:5])):
        q, x, p = _degenerate(kind, 0.7, seed=50 + k)
        T = torch.tensor([0.0, 0.7, 1.0])
        rule = FUSED_RULES[k % len(FUSED_RULES)]
        alpha = EXTREME[rule][k % len(EXTREME[rule])]
        assert_same(q, x, p, rule=rule, alpha=alpha, T=T, **trunc)


def test_fp64_goes_to_the_reference():
    q, x, p = make_block(2, 3, 64, torch.float32, seed=4)
    assert cpu.handles(q, p, 5, 0.9)
    assert not cpu.handles(q.double(), p, None, None)
    assert_same(q.double(), x, p.double(), rule="opt", alpha=0.5, T=1.0, top_k=5)


def test_near_tie_acceptance_is_a_float_tie():
    """A constructed near-tie: the draft's acceptance ratio pT(x)/qT(x) is swept across the
    uniform u that decides it. The kernel agrees with the reference whenever |ratio / u - 1| is
    above 1e-6 (its documented accuracy); only inside that band may the two round differently."""
    V, seed, pos = 4, 42, 9
    u = rng.uniform_int(seed, pos, rng.ACCEPT, 0)
    q = torch.zeros(1, 2, V)  # qT = 1/4 everywhere, at T = 1
    x = torch.zeros(1, 1, dtype=torch.int64)
    kw = dict(rule="spec", temperature=1.0, seed=torch.tensor([seed]), positions=torch.tensor([pos]))
    checked = 0
    for rel in (-1e-3, -1e-5, -2e-6, -1e-8, 0.0, 1e-8, 2e-6, 1e-5, 1e-3):
        target = u * 0.25 * (1 + rel)  # the pT(x) giving ratio = u (1 + rel)
        rest = (1 - target) / (V - 1)
        p = torch.log(torch.tensor([target] + [rest] * (V - 1), dtype=torch.float64))
        p = p.float().expand(1, 2, V).contiguous()
        ratio = float(torch.softmax(p[0, 0].double(), -1)[0]) / 0.25  # what the reference sees
        ref = sc.verify(q, x, p, backend="reference", **kw)
        out = sc.verify(q, x, p, backend="cpu", **kw)
        assert int(ref.num_accepted[0]) == int(u < ratio)
        if abs(ratio / u - 1) > 1e-6:
            assert torch.equal(out.tokens, ref.tokens)
            checked += 1
    assert checked >= 6


# --- the law of what the cpu backend emits ---------------------------------------------------
N = 6000
P_MIN = 1e-4


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("rule,alpha", [("spec", None), ("token_v3", 0.4), ("opt", 0.5),
                                        ("lossy", 0.3), ("lossy_star", 0.3), ("bild", 0.8)])
def test_first_token_follows_the_target(rule, alpha, bonus):
    V, T = 8, 0.9
    q, p = logits_pair(V, seed=21, rows=2)
    draft_logits = q.unsqueeze(0).expand(N, -1, -1).float()
    target_logits = p.unsqueeze(0).expand(N, -1, -1).float()
    seeds = torch.arange(N) + 77
    drafts = sc.sample(draft_logits[:, :1], temperature=T, seed=seeds,
                       positions=torch.zeros(N, dtype=torch.int64))
    dq = draft_logits if bonus == "cascade" else draft_logits[:, :1]
    out = sc.verify(dq, drafts, target_logits, rule=rule, alpha=alpha, temperature=T,
                    seed=seeds, backend="cpu")
    law = sc.target_distribution(q.float(), p.float(), rule=rule, alpha=alpha, temperature=T)
    assert chi2_pvalue(out.tokens[:, 0], law[0]) > P_MIN
    full = out.num_accepted == 1
    bonus_law = law[1] if bonus == "cascade" else torch.softmax(p[1].float().double() / T, -1)
    assert chi2_pvalue(out.tokens[full, 1], bonus_law) > P_MIN


def test_padded_op_takes_the_rule_by_id_or_by_name():
    """verify_padded.name (defined once for every device) maps the name to the id and reaches
    the same kernel through the dispatcher."""
    g = torch.Generator().manual_seed(8)
    q, p = torch.randn(2, 4, 50, generator=g), torch.randn(2, 4, 50, generator=g)
    x = torch.randint(0, 50, (2, 3), generator=g)
    args = [q, x, p, torch.tensor([4, 5]), torch.zeros(2, dtype=torch.int64),
            torch.full((2,), 0.8, dtype=torch.float64), torch.full((2,), 0.3, dtype=torch.float64)]
    by_id = torch.ops.speccascade.verify_padded(*args, sc.RULES.index("token_v3"))
    by_name = torch.ops.speccascade.verify_padded(*args, "token_v3")
    assert all(torch.equal(u, v) for u, v in zip(by_id, by_name))
    with pytest.raises(RuntimeError, match="unknown rule"):
        torch.ops.speccascade.verify_padded(*args, "nope")


# --- the divergence budget (docs/semantics.md §9) ------------------------------------------------
# The op's verify_padded.budget computes each position's cost TV(pi, pT) inside the fused
# verification, scans it along the block and verifies the positions that would overspend like
# spec. Against the reference: tokens, num_accepted and deferred identical, spent within 1e-5
# (fp32 sums against fp64). A scan decision whose margin S + c - budget (the reference's) is
# within 1e-6 of 0 may go either way: budgets are chosen away from that, and the rows that still
# meet one are left out of the equality (and counted: a few at most).
TIE = 1e-6
# lenient enough that the prefix rules keep the drafter at some positions (a cost to charge)
BUDGET_ALPHAS = {**ALPHAS, "chow": [0.6, 0.9], "chow_log": [3.0, 5.0], "bild": [5.0, 8.0]}


def _scan_margins(cost, budget):
    """The reference scan's |S + c - budget| per position (inf where the cost is exactly 0: a
    structural zero the kernel computes exactly too, such as a prefix rule's deferral)."""
    S = torch.zeros_like(budget)
    out = torch.full_like(cost, float("inf"))
    for j in range(cost.shape[1]):
        c = cost[:, j]
        keep = S + c <= budget
        with torch.no_grad():
            m = (S + c - budget).abs()
        out[:, j] = torch.where((c > 0) & torch.isfinite(budget), m, float("inf"))
        S = S + torch.where(keep, c, 0.0)
    return out


def _budgets(cost):
    """Per row: 0, a small and a mid budget (0.3 and 0.7 of the row's total cost) and inf, each
    nudged up (by up to 3e-3) while a scan decision lies within TIE of it."""
    B = cost.shape[0]
    total = cost.sum(1)
    budget = torch.stack([torch.zeros(()), 0.3 * total[1 % B], 0.7 * total[2 % B],
                          torch.tensor(float("inf"), dtype=torch.float64)])[:B].clone()
    for _ in range(3):
        near = (_scan_margins(cost[:len(budget)], budget) <= TIE).any(1)
        near[0] = False  # budget 0: costs are 0 (kept) or clearly positive (exact)
        budget = torch.where(near, budget + 1e-3, budget)
    return budget


def assert_budget_same(q, x, p, *, rule, alpha, T, bonus="cascade", budget=None, **kw):
    """The cpu backend with a budget per row against the reference (see the section's comment);
    ``budget`` None: :func:`_budgets` of the reference's costs. Returns ``(out, cost, budget)``,
    ``cost`` each position's cost as the reference computes it."""
    B, gamma = x.shape
    dq = q if bonus == "cascade" else q[:, :gamma]
    args = dict(rule=rule, alpha=alpha, temperature=T, seed=torch.arange(B) * 7 + 1,
                positions=torch.arange(B) * 5 + 2, **kw)
    cost = sc.verify(dq, x, p, backend="reference", divergence_budget=float("inf"), **args).spent
    budget = _budgets(cost) if budget is None else budget
    ref = sc.verify(dq, x, p, backend="reference", divergence_budget=budget, **args)
    out = sc.verify(dq, x, p, backend="cpu", divergence_budget=budget, **args)
    what = f"{rule} alpha={alpha} T={T} {tuple(p.shape)} {p.dtype} bonus={bonus} {kw}"
    assert out.spent is not None and out.spent.dtype == torch.float64
    assert out.spent.shape == (B, gamma + 1)
    tie = (_scan_margins(cost, budget) <= TIE).any(1)
    assert int(tie.sum()) <= 1, f"{what}: {int(tie.sum())} rows at a budget tie: {budget}"
    ok = ~tie
    for name in ("tokens", "num_accepted", "deferred"):
        a, b = getattr(out, name)[ok], getattr(ref, name)[ok]
        assert torch.equal(a, b), f"{what} {name}\n{b}\n{a}"
    assert torch.allclose(out.spent[ok], ref.spent[ok], rtol=0, atol=1e-5), \
        f"{what}\n{ref.spent}\n{out.spent}"
    _assert_within_budget(out, budget)
    return out, cost, budget


def _assert_within_budget(out, budget):
    """Every row's emitted positions charge at most its budget (and no charge is negative)."""
    cols = torch.arange(out.tokens.shape[1])
    emitted = cols[None] <= out.num_accepted[:, None]
    spent = torch.where(emitted, out.spent, 0.0).sum(1)
    assert bool((out.spent >= 0).all())
    assert bool((spent <= budget + 1e-6).all()), (spent, budget)


@pytest.mark.parametrize("T", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_budget_equals_reference(rule, T):
    """Every fused rule, both bonus policies, fp32 and bf16 logits, with and without top-k /
    top-p, four budgets per call (0, small, mid, inf); V = 300 and, on alternate cases, 20000
    (two 16384-wide chunks)."""
    index = sc.RULES.index(rule) * 3 + int(T * 10)
    costly = forced = charged = 0
    combos = itertools.product(("cascade", "verifier"), ("fp32", "bf16"),
                               ({}, {"top_k": 5}, {"top_p": 0.8, "top_k": 40}))
    for k, (bonus, dt, trunc) in enumerate(combos):
        V = 20000 if (k + index) % 4 == 0 else 300
        q, x, p = make_block(4, 4, V, DTYPES[dt], seed=300 + 20 * index + k, T=T)
        if trunc:  # drafts from the truncated qT, as the engine draws them
            x = sc.sample(q[:, :4], temperature=T, seed=torch.arange(4) + k, **trunc)
        alpha = BUDGET_ALPHAS[rule][k % len(BUDGET_ALPHAS[rule])]
        out, cost, budget = assert_budget_same(q, x, p, rule=rule, alpha=alpha, T=T,
                                               bonus=bonus, **trunc)
        costly += int((cost > 0).sum())
        forced += int(((cost > 0) & (out.spent == 0)).sum())  # made exact by the scan
        charged += int((out.spent > 0).sum())
        if bonus == "verifier":
            assert bool((out.spent[:, -1] == 0).all())
    if costly:  # (spec, greedy lossy rules and a prefix rule that always defers cost nothing)
        assert charged > 0 and forced > 0, (charged, forced)
    else:
        assert charged == 0


@pytest.mark.parametrize("alpha", [0.9, 0.999])
def test_budget_token_rule_with_a_large_set_a(alpha):
    """token_v3's cost gathers the tokens of A with pT > qT during the eta pass; alpha = 0.999
    puts 400 to 3000 of them in a 16384-wide chunk, beyond what the pass keeps (1024), so some
    positions take the separate cost pass and others not; both equal the reference."""
    for k, (T, bonus) in enumerate([(1.0, "cascade"), (0.7, "verifier")]):
        q, x, p = make_block(3, 4, 40000, torch.float32, seed=77 + k, T=T)
        assert_budget_same(q, x, p, rule="token_v3", alpha=alpha, T=T, bonus=bonus)


def test_budget_zero_is_spec_and_inf_the_plain_rule():
    """Budget 0 verifies every costly position like spec; inf changes nothing but the charges."""
    q, x, p = make_block(3, 4, 500, torch.float32, seed=17)
    kw = dict(temperature=0.9, seed=torch.arange(3), backend="cpu")
    spec = sc.verify(q, x, p, rule="spec", **kw)
    for rule in ("drafter", "token_v3", "lossy", "lossy_star", "opt"):
        alpha = ALPHAS[rule][-1]
        zero = sc.verify(q, x, p, rule=rule, alpha=alpha, divergence_budget=0.0, **kw)
        plain = sc.verify(q, x, p, rule=rule, alpha=alpha, **kw)
        inf = sc.verify(q, x, p, rule=rule, alpha=alpha, divergence_budget=float("inf"), **kw)
        assert plain.spent is None
        assert torch.equal(zero.tokens, spec.tokens) and bool((zero.spent == 0).all()), rule
        assert torch.equal(inf.tokens, plain.tokens), rule
        assert torch.equal(inf.num_accepted, plain.num_accepted), rule
        assert bool((inf.spent > 0).any()), rule


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("rule", ["drafter", "chow", "opt_log", "token_v1", "token_v3", "lossy",
                                  "lossy_star", "bild"])
def test_budget_every_path_spends_at_most_it(rule, bonus):
    B, gamma, V = 200, 4, 64
    q, x, p = make_block(B, gamma, V, torch.bfloat16, seed=41, T=1.0, sharp=1.0)
    g = torch.Generator().manual_seed(1)
    budget = torch.rand(B, generator=g, dtype=torch.float64) * 0.6
    budget[:10] = 0.0
    dq = q if bonus == "cascade" else q[:, :gamma]
    out = sc.verify(dq, x, p, rule=rule, alpha=BUDGET_ALPHAS[rule][-1], seed=torch.arange(B),
                    divergence_budget=budget, backend="cpu")
    _assert_within_budget(out, budget)
    assert bool((out.spent > 0).any()), "the case needs paths that spend"
    assert bool(out.deferred[:10][out.spent[:10] == 0].all())  # budget 0: exact or free
    if bonus == "verifier":
        assert bool((out.spent[:, gamma] == 0).all())


def test_budget_results_do_not_depend_on_the_thread_count():
    B, gamma, V = 2, 5, 70000
    q, x, p = make_block(B, gamma, V, torch.bfloat16, seed=8)
    budget = torch.tensor([0.2, 1.0], dtype=torch.float64)
    for rule in ("drafter", "opt", "token_v2", "lossy", "lossy_star"):
        kw = dict(rule=rule, alpha=ALPHAS[rule][-1], temperature=0.9, seed=torch.tensor([3, 4]),
                  divergence_budget=budget)
        torch.set_num_threads(1)
        one = sc.verify(q, x, p, backend="cpu", **kw)
        torch.set_num_threads(2)
        two = sc.verify(q, x, p, backend="cpu", **kw)
        assert all(torch.equal(a, b) for a, b in zip(one, two)), rule


def test_budget_op_overload_and_its_checks():
    """verify_padded keeps its three outputs; verify_padded.budget adds spent and refuses a
    budget of the wrong shape, dtype or sign."""
    g = torch.Generator().manual_seed(8)
    q, p = torch.randn(2, 4, 50, generator=g), torch.randn(2, 4, 50, generator=g)
    x = torch.randint(0, 50, (2, 3), generator=g)
    args = [q, x, p, torch.tensor([4, 5]), torch.zeros(2, dtype=torch.int64),
            torch.full((2,), 0.8, dtype=torch.float64), torch.full((2,), 0.3, dtype=torch.float64),
            sc.RULES.index("token_v3")]
    ops = torch.ops.speccascade
    assert len(ops.verify_padded(*args)) == 3
    out = ops.verify_padded.budget(*args, budget=torch.tensor([0.1, float("inf")],
                                                              dtype=torch.float64))
    assert len(out) == 4 and out[3].shape == (2, 4) and out[3].dtype == torch.float64
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(2),
                torch.tensor([0.1, -1.0], dtype=torch.float64),
                torch.tensor([0.1, float("nan")], dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="budget"):
            ops.verify_padded.budget(*args, budget=bad)


def test_budget_calls_run_on_the_cpu_kernel(monkeypatch):
    """The registry sends budget calls to the C++ op, not to the reference."""
    from speccascade_fast.backends import reference

    assert backends.REGISTRY["cpu"].budget
    q, x, p = make_block(2, 3, 100, torch.float32, seed=5)
    kw = dict(rule="lossy", alpha=0.3, seed=torch.arange(2), divergence_budget=0.2)
    want = sc.verify(q, x, p, backend="reference", **kw)

    def refuse(*a, **k):
        raise AssertionError("a budget call went to the reference")

    monkeypatch.setattr(reference, "verify", refuse)
    out = sc.verify(q, x, p, backend="cpu", **kw)
    assert torch.equal(out.tokens, want.tokens)
    assert torch.allclose(out.spent, want.spent, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [0.0, 1.0])
def test_budget_engine_on_cpu_equals_reference(T):
    """generate with a divergence budget on the static engine: the C++ op gives the reference's
    sequences and per-sequence spending."""
    from .helpers import tiny_pair

    q, p = tiny_pair()
    ids = torch.randint(3, 60, (3, 5), generator=torch.Generator().manual_seed(0))
    for rule, alpha, budget in (("token_v3", 0.6, 0.3), ("lossy", 0.5, 0.15),
                                ("chow", 0.6, 0.5)):
        kw = dict(rule=rule, alpha=alpha, temperature=T, max_new_tokens=20, seed=3,
                  divergence_budget=budget, engine="static")
        c = sc.generate(q, p, ids, backend="cpu", **kw)
        r = sc.generate(q, p, ids, backend="reference", **kw)
        assert torch.equal(c.sequences, r.sequences), rule
        got = [s["divergence_spent"] for s in c.stats["per_sequence"]]
        want = [s["divergence_spent"] for s in r.stats["per_sequence"]]
        assert got == pytest.approx(want, abs=1e-5), rule
        assert all(s <= budget + 1e-6 for s in got)
        if T:
            assert max(got) > 0, "the case needs sequences that spend"
