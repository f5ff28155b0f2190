"""The ``ensemble`` rule (docs/semantics.md §9): Hugging Face's ``assistant_ensemble_weight`` as one
more target of ours, pi = w * pT + (1 - w) * qT with w = alpha. Its law, its limits, its routing
to the reference on every backend, and its equality with HF's own assisted generation on tiny
models (the per-position acceptance and residual exactly; the emitted law by chi-squared at
T > 0; the tokens exactly at T = 0). CPU, seconds."""
from __future__ import annotations

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends, rules
from speccascade_fast.backends import reference

from .helpers import chi2_pvalue, logits_pair, tiny_pair

V = 12


def test_alpha_range_and_routing():
    assert "ensemble" in sc.RULES and "ensemble" not in rules.FUSED_RULES
    assert rules.ALPHA_RANGES["ensemble"] == (0.0, 1.0, True, True)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"range \[0, 1\] of rule 'ensemble'"):
            rules.check_alpha("ensemble", bad)
    f32 = torch.zeros(2, 4)
    for name in ("cpu", "cuda", "triton"):
        assert not backends.covers(name, "verify", f32, f32, rule="ensemble")
        assert not backends.covers(name, "verify_ragged", f32, f32, rule="ensemble")
        assert backends.covers(name, "verify", f32, f32, rule="token_v3")
    assert backends.covers("reference", "verify", f32, f32, rule="ensemble")


@pytest.mark.parametrize("T", [0.0, 0.7, 1.0])
def test_limits_are_spec_and_drafter(T):
    q, p = logits_pair(V, seed=3, rows=8)
    law = lambda rule, a=None: sc.target_distribution(q, p, rule=rule, alpha=a, temperature=T)  # noqa: E731
    assert torch.allclose(law("ensemble", 1.0), law("spec"), atol=1e-15)
    assert torch.allclose(law("ensemble", 0.0), law("drafter"), atol=1e-15)
    if T > 0:
        w = 0.35
        assert torch.allclose(law("ensemble", w), w * law("spec") + (1 - w) * law("drafter"),
                              atol=1e-15)


def test_acceptance_and_residual_are_hfs_formulas():
    """HF's ``_speculative_sampling`` with ``assistant_ensemble_weight = w``: a draft x is kept
    with probability min(1, 1 - w + w p(x) / q(x)) and a rejection resamples from norm((p - q)+)
    (p, q its processed, i.e. tempered, distributions). Ours, exactly (float64)."""
    q, p = logits_pair(V, seed=5, rows=16)
    for w in (0.1, 0.5, 0.9):
        for T in (0.7, 1.0):
            t = rules.position_targets(q, p, rule="ensemble",
                                       alpha=torch.full((16,), w, dtype=torch.float64),
                                       temperature=torch.full((16,), T, dtype=torch.float64))
            ours = torch.clamp(t.accept / t.qT, max=1)
            hfs = torch.clamp(1 - w + w * t.pT / t.qT, max=1)
            assert torch.allclose(ours, hfs, rtol=1e-12, atol=0)
            res = torch.clamp(t.pT - t.qT, min=0)
            assert torch.allclose(t.residual / t.residual.sum(-1, keepdim=True),
                                  res / res.sum(-1, keepdim=True), rtol=1e-12, atol=1e-15)
            assert torch.allclose(t.law, w * t.pT + (1 - w) * t.qT, atol=1e-14)


def test_hfs_speculative_sampling_emits_our_law():
    """HF's own per-position step (``_speculative_sampling``, one candidate) on fixed logits,
    2,000 times: its emitted token follows our ``target_distribution`` (chi-squared)."""
    from transformers.generation.utils import _speculative_sampling

    q, p = logits_pair(6, seed=9, rows=2)
    w, T, N = 0.4, 0.8, 2000
    cand_logits = (q[:1] / T).float()[None]  # [1, 1, V]: the assistant's processed scores
    new_logits = (p / T).float()[None]  # [1, 2, V]: the target's at the draft and bonus
    torch.manual_seed(0)
    qT = torch.softmax(cand_logits[0, 0].double(), -1)
    emitted = []
    for _ in range(N):
        x = torch.multinomial(qT, 1)
        ids = torch.cat([torch.tensor([[1, 2, 3]]), x[None]], dim=1)
        valid, _ = _speculative_sampling(ids, cand_logits, 1, new_logits,
                                         assistant_ensemble_weight=w)
        emitted.append(int(valid[0, 0]))
    law = sc.target_distribution(q, p, rule="ensemble", alpha=w, temperature=T)[0]
    assert chi2_pvalue(torch.tensor(emitted), law) > 1e-3
    spec = sc.target_distribution(q, p, rule="spec", temperature=T)[0]
    assert chi2_pvalue(torch.tensor(emitted), spec) < 1e-6  # the test can tell the two apart


def test_verify_emits_the_law_on_every_backend():
    """``verify`` (first token and bonus) follows the law; backend="cpu" / "auto" (the C++ op
    where it is built) route the rule to the reference: the same tokens."""
    N, T, w = 6000, 1.0, 0.3
    q, p = logits_pair(8, seed=21, rows=2)
    dq = q.unsqueeze(0).expand(N, -1, -1).float()
    dp = p.unsqueeze(0).expand(N, -1, -1).float()
    seeds = torch.arange(N)
    drafts = sc.sample(dq[:, :1], temperature=T, seed=seeds,
                       positions=torch.zeros(N, dtype=torch.int64))
    outs = {b: sc.verify(dq, drafts, dp, rule="ensemble", alpha=w, temperature=T, seed=seeds,
                         backend=b) for b in backends.available()}
    ref = outs["reference"]
    for out in outs.values():
        assert torch.equal(out.tokens, ref.tokens)
    law = sc.target_distribution(q.float(), p.float(), rule="ensemble", alpha=w, temperature=T)
    assert chi2_pvalue(ref.tokens[:, 0], law[0]) > 1e-4
    full = ref.num_accepted == 1
    assert chi2_pvalue(ref.tokens[full, 1], law[1]) > 1e-4
    assert bool(ref.deferred.all())  # the verifier's p enters every position's target


def test_greedy_target_is_the_argmax_of_the_unscaled_mixture():
    q, p = logits_pair(V, seed=13, rows=32)
    w = 0.5
    law = sc.target_distribution(q, p, rule="ensemble", alpha=w, temperature=0.0)
    mix = w * torch.softmax(p, -1) + (1 - w) * torch.softmax(q, -1)
    assert torch.equal(law.argmax(-1), mix.argmax(-1))
    assert bool((law.max(-1).values == 1).all())
    # somewhere the mixture's argmax is neither model's: the rule is not a per-row choice
    assert bool(((mix.argmax(-1) != q.argmax(-1)) | (mix.argmax(-1) != p.argmax(-1))).any())


# --- against Hugging Face's assisted generation on tiny models ------------------------------------
GAMMA = 3


@pytest.fixture(scope="module")
def models():
    """A tiny pair; HF reads the assistant's draft length from the assistant's generation
    config: a constant ``GAMMA`` drafts per block, no confidence cut-off."""
    q, p = tiny_pair(V=16, seed=7, init=0.5, noise=0.8)
    q.generation_config.num_assistant_tokens = GAMMA
    q.generation_config.num_assistant_tokens_schedule = "constant"
    q.generation_config.assistant_confidence_threshold = 0.0
    return q, p


PROMPT = [3, 5, 7, 9, 2]


def _hf(verifier, drafter, prompt=PROMPT, **kw):
    if kw.get("do_sample"):
        kw["top_k"] = 0  # HF's default top-k of 50 would truncate
    # a pad id outside the vocabulary: HF masks every pad-id token of the assistant's inputs
    return verifier.generate(torch.tensor([prompt]), assistant_model=drafter, pad_token_id=999,
                             eos_token_id=None, **kw)


def test_first_token_law_equals_hf_generate(models):
    """HF ``generate(..., assistant_ensemble_weight=w, do_sample=True)``'s first new token, over
    500 seeds, follows our law at the prompt (chi-squared), which is not the verifier's."""
    q, p = models
    w, T, N = 0.3, 1.0, 500
    firsts = []
    for s in range(N):
        torch.manual_seed(s)
        out = _hf(p, q, do_sample=True, temperature=T, max_new_tokens=2,
                  assistant_ensemble_weight=w)  # one draft (the budget), then the bonus
        firsts.append(int(out[0, len(PROMPT)]))
    with torch.no_grad():
        ql = q(torch.tensor([PROMPT])).logits[0, -1:].double()
        pl = p(torch.tensor([PROMPT])).logits[0, -1:].double()
    law = sc.target_distribution(ql, pl, rule="ensemble", alpha=w, temperature=T)[0]
    firsts = torch.tensor(firsts)
    assert chi2_pvalue(firsts, law) > 1e-3
    spec = sc.target_distribution(ql, pl, rule="spec", temperature=T)[0]
    assert 0.5 * (law - spec).abs().sum() > 0.1  # the pair disagrees enough to tell them apart
    # and our engine's first tokens follow the same law
    ours = sc.generate(q, p, torch.tensor([PROMPT] * N), rule="ensemble", alpha=w,
                       temperature=T, max_new_tokens=1, gamma=1, seed=0, eos_token_id=[])
    assert chi2_pvalue(torch.tensor([t[0] for t in ours.new_tokens]), law) > 1e-3


@pytest.mark.parametrize("w", [0.3, 0.7])
def test_greedy_tokens_equal_hf_generate(models, w):
    """At T = 0 HF accepts a draft while it is the argmax of w p + (1 - w) q and takes the
    bonus token from p: our ``ensemble`` with ``bonus="verifier"`` emits the same tokens, for
    the same block boundaries (HF's constant schedule of GAMMA drafts). HF drafts fewer tokens
    in its last block (up to its budget), so the last GAMMA + 1 tokens are not compared."""
    q, p = models
    n, rejected = 24, 0
    for prompt in ([3, 5, 7, 9, 2], [1, 2, 3], [8, 8, 4, 1, 0, 6]):
        hf = _hf(p, q, prompt, do_sample=False, max_new_tokens=n + GAMMA + 1,
                 assistant_ensemble_weight=w)[0, len(prompt):].tolist()
        ours = sc.generate(q, p, torch.tensor([prompt]), rule="ensemble", alpha=w,
                           temperature=0.0, gamma=GAMMA, bonus="verifier",
                           max_new_tokens=n + GAMMA + 1, eos_token_id=[])
        assert ours.new_tokens[0][:n] == hf[:n], prompt
        rejected += ours.stats["rejected"]
        spec = sc.generate(q, p, torch.tensor([prompt]), rule="spec", temperature=0.0,
                           gamma=GAMMA, max_new_tokens=n, eos_token_id=[])
    assert rejected > 0  # drafts that are not the mixture's argmax were tested too
    assert spec.new_tokens[0] != hf[:n]  # and the mixture is not the verifier


def test_reference_verify_is_what_the_engines_call():
    """The dispatch sends ensemble to ``reference.verify`` even when a fused backend is named."""
    q, p = logits_pair(8, seed=2, rows=3)
    dq, dp = q[None].float(), p[None].float()
    x = torch.tensor([[1, 2]])
    args = dict(rule="ensemble", alpha=torch.tensor([0.6], dtype=torch.float64),
                temperature=torch.tensor([1.0], dtype=torch.float64), top_k=None, top_p=None,
                seed=torch.tensor([4]), positions=torch.tensor([0]))
    want = reference.verify(dq, x, dp, **args)
    for name in backends.available():
        got = backends.verify(name, dq, x, dp, **args)
        assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
