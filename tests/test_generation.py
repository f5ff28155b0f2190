"""The decoding engine on tiny random Hugging Face models (CPU, fp32).

* greedy equalities: at T = 0 every lossless configuration emits the verifier's greedy output
  token for token (HF ``generate(do_sample=False)`` is the reference), for gamma in {1, 3, 5},
  both bonus policies, left-padded batches;
* distributions: the first two new tokens of thousands of seeds against their exact law,
  enumerated from the two models' logits (chi-squared);
* bookkeeping: statistics, EOS inside a block, the token budget, seeds and batches, bad inputs;
* encoder-decoder (T5) pairs.

The pair: the verifier is a random Llama; the drafter is a copy with its LM head perturbed by
noise from another seed, so the two agree often enough for multi-token acceptance, rollback and
bonus tokens to happen (two independent random models almost never agree).
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from speccascade_fast import Engine, generate, target_distribution
from speccascade_fast.config import DEFAULT_ALPHA
from speccascade_fast.probs import scaled

from .helpers import PAD, PROMPTS, chi2_pvalue, left_padded, noisy_drafter, tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


NEW = 24


@pytest.fixture(scope="module")
def greedy(pair):
    """HF greedy new tokens of each prompt: ``{"verifier": [...], "drafter": [...]}``."""
    out = {}
    for name, model in zip(("drafter", "verifier"), pair):
        out[name] = [
            model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW,
                           pad_token_id=PAD)[0, len(p):].tolist()
            for p in PROMPTS
        ]
    return out


def run_batch(pair, **kw):
    ids, mask = left_padded(PROMPTS)
    out = generate(*pair, ids, attention_mask=mask, temperature=0, max_new_tokens=NEW,
                   eos_token_id=[], **kw)
    assert out.sequences.shape == (len(PROMPTS), ids.shape[1] + NEW)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert [row[ids.shape[1]:].tolist() for row in out.sequences] == out.new_tokens
    return out


# --- greedy equalities --------------------------------------------------------------------------
LOSSLESS = [
    ("spec_cascade", "spec", None),
    ("spec_cascade", "diff", -1.0),
    ("spec_cascade", "token_v3", -0.5),
    ("spec_cascade", "opt", -1e6),
    ("spec_cascade", "lossy", 0.0),
    ("oracle_cascade", "diff", -1.0),
    ("token_cascade", "chow", 0.0),
]


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("method,rule,alpha", LOSSLESS)
def test_greedy_lossless_equals_verifier(pair, greedy, method, rule, alpha, gamma):
    bonuses = ("cascade", "verifier") if method == "spec_cascade" else ("cascade",)
    for bonus in bonuses:
        out = run_batch(pair, method=method, rule=rule, alpha=alpha, gamma=gamma, bonus=bonus)
        assert out.new_tokens == greedy["verifier"], (method, rule, gamma, bonus)
    if method == "spec_cascade":
        assert out.stats["accepted"] > 0  # the pair agrees sometimes: acceptance paths ran


@pytest.mark.parametrize("engine", ["static", "sequential"])
@pytest.mark.parametrize("rule,alpha", [("spec", None), ("token_v3", -0.5)])
def test_greedy_lossless_with_draft_confidence(pair, greedy, rule, alpha, engine):
    """Blocks cut short by ``draft_confidence`` are still lossless; the cut happened (fewer
    drafts than fixed blocks of gamma) and blocks of several drafts remained."""
    for threshold in (0.2, 0.4):
        out = run_batch(pair, rule=rule, alpha=alpha, gamma=5, draft_confidence=threshold,
                        engine=engine)
        assert out.new_tokens == greedy["verifier"], threshold
        fixed = run_batch(pair, rule=rule, alpha=alpha, gamma=5, engine=engine)
        assert out.stats["drafted"] < fixed.stats["drafted"], threshold
        assert out.stats["blocks"] < out.stats["drafted"], threshold


def test_greedy_autoregressive_and_drafter_only(pair, greedy):
    assert run_batch(pair, method="autoregressive").new_tokens == greedy["verifier"]
    assert run_batch(pair, method="drafter_only").new_tokens == greedy["drafter"]
    assert run_batch(pair, rule="drafter", gamma=4).new_tokens == greedy["drafter"]
    assert greedy["drafter"] != greedy["verifier"]


def test_greedy_lenient_token_v3_differs_and_accepts_more(pair, greedy):
    strict = run_batch(pair, rule="spec", gamma=3)
    loose = run_batch(pair, rule="token_v3", alpha=0.9, gamma=3)
    assert loose.stats["acceptance_rate"] > strict.stats["acceptance_rate"]
    assert loose.stats["verifier_calls"] < strict.stats["verifier_calls"]


@pytest.mark.parametrize("alpha", [-0.2, 0.0, 0.3])
def test_lemma8_opt_equals_diff_at_t0(pair, alpha):
    a = run_batch(pair, rule="opt", alpha=alpha, gamma=3)
    b = run_batch(pair, rule="diff", alpha=alpha, gamma=3)
    assert a.new_tokens == b.new_tokens


# --- exact laws of the first two new tokens -------------------------------------------------------
DIST_V = 12
DIST_SEEDS = 1500
DIST_PROMPT = [3, 5, 7, 9]


@pytest.fixture(scope="module")
def small_pair():
    return tiny_pair(V=DIST_V, seed=3, init=0.3, noise=0.6, layers=1, hidden=16)


@torch.no_grad()
def _next_logits(model, prefixes: torch.Tensor) -> torch.Tensor:
    return model(prefixes).logits[:, -1].double()


def _laws(pair, **kw):
    """Per-position laws of the first two new tokens: ``(pi1 [V], pi2 [V, V])`` (row x1), for
    ``target_distribution(**kw)``, plus the logits they came from."""
    q, p = pair
    prompt = torch.tensor([DIST_PROMPT])
    ext = torch.cat([prompt.repeat(DIST_V, 1), torch.arange(DIST_V)[:, None]], dim=1)
    l1 = (_next_logits(q, prompt), _next_logits(p, prompt))
    l2 = (_next_logits(q, ext), _next_logits(p, ext))
    return (target_distribution(*l1, **kw)[0], target_distribution(*l2, **kw)), l1, l2


def _two_token_sample(pair, **kw) -> torch.Tensor:
    ids = torch.tensor([DIST_PROMPT]).repeat(DIST_SEEDS, 1)
    out = generate(*pair, ids, seed=0, max_new_tokens=2, eos_token_id=[], **kw)
    new = torch.tensor(out.new_tokens)
    assert new.shape == (DIST_SEEDS, 2)
    return new[:, 0] * DIST_V + new[:, 1], out.stats


def _tv(a, b):
    return float((a - b).clamp(min=0).sum())


DIST_CASES = [
    # method, rule, alpha, gamma, bonus, temperature, top_k, top_p
    ("spec_cascade", "spec", None, 2, "cascade", 1.0, None, None),
    ("spec_cascade", "chow", 0.5, 2, "cascade", 1.0, None, None),
    ("spec_cascade", "opt", 0.5, 2, "cascade", 0.7, 6, 0.9),
    ("spec_cascade", "token_v3", 0.3, 2, "cascade", 1.0, None, None),
    ("spec_cascade", "token_v3", 0.5, 1, "cascade", 1.0, None, None),
    ("spec_cascade", "lossy", 0.4, 2, "cascade", 1.0, None, None),
    ("token_cascade", "chow", 0.5, 5, "cascade", 1.0, None, None),
    ("oracle_cascade", "diff", 0.0, 5, "cascade", 1.0, None, None),
]


@pytest.mark.parametrize("method,rule,alpha,gamma,bonus,temperature,top_k,top_p", DIST_CASES)
def test_two_token_law(small_pair, method, rule, alpha, gamma, bonus, temperature, top_k, top_p):
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    (pi1, pi2), _, _ = _laws(small_pair, rule=rule, alpha=alpha, **knobs)
    law = (pi1[:, None] * pi2).flatten()
    if rule not in ("spec", "lossy"):  # the test can tell this law from the verifier's
        (s1, s2), _, _ = _laws(small_pair, rule="spec", **knobs)
        assert _tv(law, (s1[:, None] * s2).flatten()) > 0.05
    tokens, stats = _two_token_sample(small_pair, method=method, rule=rule, alpha=alpha,
                                      gamma=gamma, bonus=bonus, **knobs)
    assert chi2_pvalue(tokens, law) > 1e-3
    assert stats["tokens"] == 2 * DIST_SEEDS


@pytest.mark.parametrize("rule,alpha,bonus", [("spec", None, "cascade"),
                                              ("token_v3", 0.3, "cascade"),
                                              ("chow", 0.5, "verifier")])
def test_two_token_law_with_draft_confidence(small_pair, rule, alpha, bonus):
    """Stopping a block after an unsure draft reads only the drafter: the law is unchanged
    (gamma = 2, so the first block either drafts both tokens or stops after one and the second
    comes from the bonus position)."""
    (pi1, pi2), _, _ = _laws(small_pair, rule=rule, alpha=alpha)
    law = (pi1[:, None] * pi2).flatten()
    kw = dict(rule=rule, alpha=alpha, gamma=2, bonus=bonus)
    tokens, stats = _two_token_sample(small_pair, draft_confidence=0.2, **kw)
    assert chi2_pvalue(tokens, law) > 1e-3
    _, fixed = _two_token_sample(small_pair, **kw)
    assert stats["drafted"] < fixed["drafted"]  # some first blocks did stop after one draft


def test_two_token_law_verifier_bonus(small_pair):
    """gamma = 1, bonus="verifier": after an accepted first draft the second token is the
    verifier's bonus (pT); after a rejected one it is the next block's, with law pi2."""
    kw = dict(rule="token_v3", alpha=0.5)
    (pi1, pi2), l1, l2 = _laws(small_pair, **kw)
    qT1 = target_distribution(*l1, rule="drafter")[0]
    pT2 = target_distribution(*l2, rule="spec")
    kept = torch.minimum(qT1, pi1)  # mass of x1 emitted as an accepted draft
    law = (kept[:, None] * pT2 + (pi1 - kept)[:, None] * pi2).flatten()
    assert _tv(law, (pi1[:, None] * pi2).flatten()) > 0.02  # differs from the cascade bonus
    tokens, _ = _two_token_sample(small_pair, gamma=1, bonus="verifier", **kw)
    assert chi2_pvalue(tokens, law) > 1e-3


def test_seq_cascade_law(small_pair):
    """eq. (1) over two-token answers: P(y) = q(y) 1[s(y) >= 1 - alpha] + P(defer) p(y)."""
    q, p = small_pair
    (qa, qb), _, _ = _laws(small_pair, rule="drafter")
    (pa, pb), _, _ = _laws(small_pair, rule="spec")
    q_y, p_y = (qa[:, None] * qb).flatten(), (pa[:, None] * pb).flatten()
    score = q_y.sqrt()  # exp(mean log q) of a two-token answer (T = 1: q1 = qT)
    ordered = torch.sort(score).values
    i = int(torch.searchsorted(torch.cumsum(q_y[torch.argsort(score)], 0), 0.5))
    alpha = 1 - float(ordered[i] + ordered[i + 1]) / 2  # a threshold between two answers
    keep = score >= 1 - alpha
    law = q_y * keep + (q_y * ~keep).sum() * p_y
    tokens, stats = _two_token_sample(small_pair, method="seq_cascade", alpha=alpha,
                                      seq_score="mean_logprob")
    assert 0.2 < stats["sequences_deferred"] / DIST_SEEDS < 0.8
    assert chi2_pvalue(tokens, law) > 1e-3


# --- statistics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["static", "sequential"])
@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("rule,alpha", [("spec", None), ("token_v3", 0.3), ("chow", 0.5),
                                        ("lossy", 0.3)])
def test_stats_spec_cascade(pair, rule, alpha, bonus, engine):
    ids, mask = left_padded(PROMPTS)
    out = generate(*pair, ids, attention_mask=mask, rule=rule, alpha=alpha, gamma=3, bonus=bonus,
                   max_new_tokens=17, seed=5, eos_token_id=[], engine=engine)
    s = out.stats
    assert s["tokens"] == sum(map(len, out.new_tokens)) == 3 * 17
    assert s["verifier_calls"] == s["blocks"]
    bonus_step = bonus == "cascade" and rule != "spec"  # spec's bonus law is pT: no q needed
    # the bonus drafter step runs only in blocks that accepted every draft (at batch 3 in the
    # static engine: where any row did), except where the bonus would be cut by the budget
    steps = 3 * s["blocks"] if engine == "static" else s["drafted"]  # fixed shapes: gamma each
    if not bonus_step:
        assert s["drafter_calls"] == steps
    elif engine == "static":
        assert steps < s["drafter_calls"] < steps + s["blocks"]
    else:
        assert s["rejected"] > 3  # (so that a bonus step after every block would be caught)
        full = s["blocks"] - s["rejected"]  # blocks that accepted all their drafts
        assert full - 3 <= s["drafter_calls"] - steps <= full  # 3 budgets: up to 3 cut bonuses
    assert 0 <= s["accepted"] <= s["drafted"] and s["rejected"] <= s["blocks"]
    assert s["tokens"] <= s["accepted"] + s["blocks"]
    for k in ("rejection_rate", "acceptance_rate", "deferral_rate", "deferrals_per_token"):
        assert 0.0 <= s[k] <= 1.0, k
    assert s["rejection_rate"] == s["rejected"] / (s["accepted"] + s["rejected"])
    assert s["deferrals_per_token"] == s["verifier_calls"] / s["tokens"]
    assert s["tokens_per_verifier_call"] == s["tokens"] / s["verifier_calls"]
    assert s["alpha"] == (DEFAULT_ALPHA[rule] if alpha is None else alpha)
    if rule == "spec":
        assert s["deferral_rate"] == 1.0
    assert s["wall_s"] > 0 and s["sequences"] == 3


def test_stats_sequential_methods(pair):
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=9, eos_token_id=[])
    s = generate(*pair, ids, method="autoregressive", **kw).stats
    assert s["verifier_calls"] == s["tokens"] == 27 and s["drafter_calls"] == 0
    assert s["deferral_rate"] == 1.0
    s = generate(pair[0], None, ids, method="drafter_only", **kw).stats
    assert s["drafter_calls"] == s["tokens"] == 27 and s["verifier_calls"] == 0
    assert s["tokens_per_verifier_call"] is None and s["deferral_rate"] == 0.0
    s = generate(*pair, ids, method="oracle_cascade", rule="diff", alpha=0.0, **kw).stats
    assert s["drafter_calls"] == s["verifier_calls"] == s["tokens"] == 27
    assert 0 < s["deferred"] < 27
    s = generate(*pair, ids, method="token_cascade", rule="chow", alpha=0.5, **kw).stats
    assert s["drafter_calls"] == 27 and s["verifier_calls"] == s["deferred"]
    s = generate(*pair, ids, method="seq_cascade", alpha=1.0, **kw).stats  # never defers
    assert s["verifier_calls"] == s["sequences_deferred"] == 0
    s = generate(*pair, ids, method="seq_cascade", alpha=0.0, **kw).stats  # always defers
    assert s["sequences_deferred"] == 3 and s["verifier_calls"] == 27
    assert s["drafter_calls"] == 27 and s["deferral_rate"] == 1.0


def test_token_cascade_max_drafter_run(pair):
    ids = torch.tensor([PROMPTS[0]])
    kw = dict(method="token_cascade", rule="chow", alpha=1.0, max_new_tokens=12, eos_token_id=[])
    s = generate(*pair, ids, max_drafter_run=3, **kw).stats  # alpha = 1 never defers by itself
    assert s["deferred"] == s["verifier_calls"] == 3  # tokens 4, 8 and 12
    s = generate(*pair, ids, max_drafter_run=None, **kw).stats
    assert s["deferred"] == s["verifier_calls"] == 0


# --- EOS, budget, seeds, batches ------------------------------------------------------------------
@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
def test_eos_mid_block_stops_exactly(pair, greedy, bonus):
    ref = greedy["verifier"][0]
    k = next(i for i in range(4, NEW) if ref[i] not in ref[:i])
    eos = ref[k]
    ids, mask = left_padded(PROMPTS[:2])
    out = generate(*pair, ids, attention_mask=mask, rule="spec", gamma=5, temperature=0,
                   max_new_tokens=NEW, eos_token_id=eos, pad_token_id=63, bonus=bonus)
    assert out.new_tokens[0] == ref[: k + 1]
    row = out.sequences[0, ids.shape[1]:].tolist()
    assert row[: k + 1] == ref[: k + 1] and set(row[k + 1:]) <= {63}
    assert out.stats["tokens"] == sum(map(len, out.new_tokens))


def test_eos_inside_an_accepted_block(pair, greedy):
    """drafter = verifier: every draft is accepted, blocks are gamma + 1 = 6 tokens long, and an
    EOS at new-token index 8 sits inside the second block."""
    p = pair[1]
    ref = greedy["verifier"][0]
    k = next(i for i in range(8, NEW) if ref[i] not in ref[:i])
    out = generate(p, p, torch.tensor([PROMPTS[0]]), rule="spec", gamma=5, temperature=0,
                   max_new_tokens=NEW, eos_token_id=ref[k])
    assert out.new_tokens[0] == ref[: k + 1]
    s = out.stats
    assert s["tokens"] == k + 1 and s["verifier_calls"] == k // 6 + 1
    assert s["accepted"] == s["drafted"] and s["rejected"] == 0


def test_eos_when_sampling(pair):
    ids = torch.tensor([PROMPTS[0]]).repeat(20, 1)
    for eos in ([5, 9], 17):
        out = generate(*pair, ids, rule="token_v3", gamma=4, max_new_tokens=20, eos_token_id=eos)
        stops = set(eos) if isinstance(eos, list) else {eos}
        stopped = 0
        for new in out.new_tokens:
            assert all(t not in stops for t in new[:-1])
            stopped += new[-1] in stops
            assert len(new) == 20 or new[-1] in stops
        assert stopped > 0


@pytest.mark.parametrize("method", ["spec_cascade", "token_cascade", "oracle_cascade",
                                    "seq_cascade", "autoregressive", "drafter_only"])
def test_budget_is_exact(pair, method):
    ids = torch.tensor([PROMPTS[2]])
    for budget in (1, 2, 3, 6):
        for gamma in (1, 3, 8):
            out = generate(*pair, ids, method=method, gamma=gamma, max_new_tokens=budget,
                           seed=budget * 10 + gamma, eos_token_id=[])
            assert len(out.new_tokens[0]) == budget == out.stats["tokens"]
            assert out.sequences.shape == (1, len(PROMPTS[2]) + budget)


def test_seeds_batches_and_padding(pair):
    """A sequence's output depends only on its prompt and seed: not on its batch or padding."""
    ids, mask = left_padded(PROMPTS)
    kw = dict(rule="token_v3", alpha=0.3, gamma=3, max_new_tokens=15, eos_token_id=[])
    batch = generate(*pair, ids, attention_mask=mask, seed=7, **kw).new_tokens
    for b, prompt in enumerate(PROMPTS):
        single = generate(*pair, torch.tensor([prompt]), seed=7 + b, **kw).new_tokens[0]
        assert single == batch[b]
    again = generate(*pair, ids, attention_mask=mask, seed=[7, 8, 9], **kw).new_tokens
    assert again == batch
    other = generate(*pair, ids, attention_mask=mask, seed=8, **kw).new_tokens
    assert other != batch


# --- bad inputs -----------------------------------------------------------------------------------
def test_bad_inputs_raise(pair):
    q, p = pair
    ids = torch.tensor([[1, 2, 3]])
    other_vocab = tiny_pair(V=32)[1]
    bad = [
        (dict(drafter=other_vocab), "vocabular"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
        (dict(input_ids=ids, attention_mask=torch.zeros(1, 3)), "empty prompt"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=254), "context"),
        (dict(method="beam"), "method"),
        (dict(gamma=0), "gamma"),
        (dict(bonus="drafter"), "bonus"),
        (dict(rule="nope"), "rule"),
        (dict(rule="chow", alpha=1.5), "alpha"),
        (dict(method="token_cascade", rule="diff"), "token_cascade"),
        (dict(method="oracle_cascade", rule="token_v3"), "prefix rule"),
        (dict(method="seq_cascade", alpha=2.0), "alpha"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed=[1, 2]), "seed"),
        (dict(seq_score="max"), "seq_score"),
        (dict(verifier=None), "verifier"),
        (dict(draft_confidence=0.0), "draft_confidence"),
        (dict(draft_confidence=1.0), "draft_confidence"),
        (dict(draft_confidence=True), "draft_confidence"),
        (dict(draft_confidence="0.5"), "draft_confidence"),
        (dict(method="seq_cascade", draft_confidence=0.5), "draft_confidence"),
    ]
    for kw, needle in bad:
        args = dict(drafter=q, verifier=p, input_ids=ids)
        args.update(kw)
        with pytest.raises(ValueError, match=needle):
            generate(args.pop("drafter"), args.pop("verifier"), args.pop("input_ids"), **args)


# --- encoder-decoder ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5_pair():
    cfg = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   initializer_factor=3.0)
    torch.manual_seed(0)
    verifier = T5ForConditionalGeneration(cfg).eval()
    return noisy_drafter(verifier, 11, 0.3), verifier


def test_encoder_decoder_greedy_equals_verifier(t5_pair):
    q, p = t5_pair
    ids, mask = left_padded([[5, 6, 7, 8, 1], [9, 10, 11, 1]])
    ref = p.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                     eos_token_id=None)
    for gamma in (1, 3):
        for rule, alpha in (("spec", None), ("token_v3", -0.5), ("diff", -1.0)):
            out = generate(q, p, ids, attention_mask=mask, rule=rule, alpha=alpha, gamma=gamma,
                           temperature=0, max_new_tokens=12, eos_token_id=[])
            assert torch.equal(out.sequences, ref), (rule, gamma)
    assert out.stats["accepted"] > 0


def test_encoder_decoder_sampling_and_eos(t5_pair):
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    out = generate(*t5_pair, ids.repeat(5, 1), rule="token_v3", gamma=3, max_new_tokens=10)
    for row, new in zip(out.sequences, out.new_tokens):
        assert row[0] == 0 and row[1: 1 + len(new)].tolist() == new
        assert len(new) == 10 or new[-1] == 1


def test_models_given_as_folders_are_loaded(tmp_path):
    """drafter/verifier may be paths: models.load_model loads them (bf16, its default dtype)."""
    drafter, verifier = tiny_pair()
    drafter.save_pretrained(tmp_path / "d")
    verifier.save_pretrained(tmp_path / "v")
    ids = torch.tensor([[1, 2, 3]])
    bf16 = [LlamaForCausalLM.from_pretrained(tmp_path / d, dtype=torch.bfloat16) for d in "dv"]
    by_object = generate(*bf16, ids, temperature=0, max_new_tokens=6)
    by_path = generate(str(tmp_path / "d"), tmp_path / "v", ids, temperature=0, max_new_tokens=6)
    assert torch.equal(by_object.sequences, by_path.sequences)


# --- hooks: streaming and stopping --------------------------------------------------------------
@pytest.mark.parametrize("engine", ["static", "sequential"])
def test_on_tokens_streams_exactly_the_output_and_stop_condition_cuts_it(pair, engine):
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, rule="token_v3", gamma=3, temperature=1.0, max_new_tokens=16,
              seed=5, eos_token_id=[], engine=engine)
    streamed = {}
    out = generate(*pair, ids, on_tokens=lambda b, t: streamed.setdefault(b, []).append(t), **kw)
    assert [sum(streamed[b], []) for b in range(len(PROMPTS))] == out.new_tokens
    assert all(chunk for chunks in streamed.values() for chunk in chunks)
    stop = out.new_tokens[0][4]
    cut = generate(*pair, ids, stop_condition=lambda b, new: new[-1] == stop, **kw)
    for full, got in zip(out.new_tokens, cut.new_tokens):
        assert got == (full[: full.index(stop) + 1] if stop in full else full)


# --- min-p ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["autoregressive", "drafter_only"])
def test_min_p_engines_agree_and_follow_the_truncated_law(pair, small_pair, method):
    """min_p on the batched Engine and the sequential loop: the same tokens; the first token's
    law is the reference's min-p-truncated qT (chi-squared)."""
    ids, mask = left_padded(PROMPTS)
    kw = dict(method=method, temperature=1.3, min_p=0.2, top_k=40, max_new_tokens=10, seed=4,
              eos_token_id=[], attention_mask=mask)
    static = generate(*pair, ids, engine="static", **kw)
    seq = generate(*pair, ids, engine="sequential", **kw)
    assert static.new_tokens == seq.new_tokens
    free = generate(*pair, ids, engine="static", **dict(kw, min_p=None))
    assert free.new_tokens != static.new_tokens
    engine = Engine(*pair, max_batch_size=3, max_seq_len=64, method=method, min_p=0.2,
                    temperature=1.3, top_k=40)
    again = engine.generate(ids, attention_mask=mask, max_new_tokens=10, seed=4, eos_token_id=[])
    assert again.new_tokens == static.new_tokens
    model = small_pair[1] if method == "autoregressive" else small_pair[0]
    prompt = torch.tensor([DIST_PROMPT])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
    law = scaled(logits, torch.tensor(1.3, dtype=torch.float64), None, None, 0.2)
    assert int((law > 0).sum()) > 1
    out = generate(*small_pair, prompt.repeat(DIST_SEEDS, 1), method=method, temperature=1.3,
                   min_p=0.2, max_new_tokens=1, eos_token_id=[], seed=0)
    assert chi2_pvalue(torch.tensor([t[0] for t in out.new_tokens]), law) > 1e-3


def test_min_p_is_refused_where_a_cascade_verifies(pair):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="min_p applies to method='autoregressive'"):
        generate(*pair, ids, rule="spec", min_p=0.1)
    with pytest.raises(ValueError, match=r"min_p must be None or a number in \(0, 1\]"):
        generate(*pair, ids, method="autoregressive", min_p=1.5)


# --- goodput-adaptive gamma ---------------------------------------------------------------------
@pytest.mark.parametrize("rule,alpha,bonus,policy", [
    ("spec", None, "cascade", "goodput"),
    # the confidence predictor on (two tokens: its blocks are the controller's exploration)
    ("token_v3", 0.3, "verifier", "goodput_confidence"),
    ("token_v3", 0.3, "cascade", lambda i, batch: 1 + i % 2),  # min gamma 1 under "cascade"
    ("chow", 0.5, "verifier", lambda i, batch: i % 3),  # 0: a plain verifier step
])
def test_two_token_law_with_adaptive_gamma(small_pair, rule, alpha, bonus, policy):
    """Where blocks end never changes how a token is drawn: the law is the rule's."""
    (pi1, pi2), _, _ = _laws(small_pair, rule=rule, alpha=alpha)
    law = (pi1[:, None] * pi2).flatten()
    tokens, stats = _two_token_sample(small_pair, rule=rule, alpha=alpha, gamma=2, bonus=bonus,
                                      gamma_policy=policy)
    assert chi2_pvalue(tokens, law) > 1e-3
    assert stats["gammas"] and all(0 <= g <= 2 for g in stats["gammas"])
    if policy == "goodput_confidence":  # both predictors scored on the blocks' outcomes
        scored = stats["acceptance_log_loss"]
        assert set(scored) == {"counts", "confidence", "positions"} and scored["positions"] > 0
        assert all(0 <= scored[k] < 10 for k in ("counts", "confidence"))


def test_goodput_confidence_greedy_spec_is_the_verifiers_greedy_text(pair):
    """Where blocks end never changes a greedy lossless text: the verifier's own."""
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[], temperature=0.0)
    alone = generate(*pair, ids, method="autoregressive", **kw)
    out = generate(*pair, ids, rule="spec", gamma=4, gamma_policy="goodput_confidence", **kw)
    assert out.new_tokens == alone.new_tokens
    assert out.stats["acceptance_log_loss"]["positions"] > 0


def test_a_fixed_gamma_schedule_is_deterministic_and_batch_invariant(pair):
    ids, mask = left_padded(PROMPTS)
    kw = dict(rule="token_v3", alpha=0.3, bonus="verifier", temperature=1.0, gamma=3,
              max_new_tokens=18, eos_token_id=[], gamma_policy=lambda i, batch: [0, 3, 1, 2][i % 4])
    out = generate(*pair, ids, attention_mask=mask, seed=3, **kw)
    again = generate(*pair, ids, attention_mask=mask, seed=3, **kw)
    assert out.new_tokens == again.new_tokens and out.stats["gammas"] == again.stats["gammas"]
    alone = generate(*pair, torch.tensor([PROMPTS[1]]), seed=4, **kw)
    assert alone.new_tokens[0] == out.new_tokens[1]
    assert out.stats["gammas"][:4] == [0, 3, 1, 2]
    with pytest.raises(ValueError, match="gamma_policy returned 4"):
        generate(*pair, ids, attention_mask=mask, **dict(kw, gamma_policy=lambda i, b: 4))
    with pytest.raises(ValueError, match="gamma_policy"):
        generate(*pair, ids, attention_mask=mask, **dict(kw, gamma_policy="sometimes"))
    for adaptive in ("goodput", "goodput_confidence"):
        with pytest.raises(ValueError, match="gamma_policy"):
            generate(*pair, ids, attention_mask=mask, engine="sequential",
                     **dict(kw, gamma_policy=adaptive))


# --- exact prefix --------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["static", "sequential"])
def test_exact_prefix_first_token_law_is_the_verifiers(small_pair, engine):
    """exact_prefix=1 under a lenient token_v3: the first token's law is pT, not the rule's pi
    (which the test can tell apart)."""
    (pi1, _), _, _ = _laws(small_pair, rule="token_v3", alpha=0.9)
    (pT1, _), _, _ = _laws(small_pair, rule="spec")
    assert _tv(pi1, pT1) > 0.05
    ids = torch.tensor([DIST_PROMPT]).repeat(DIST_SEEDS, 1)
    out = generate(*small_pair, ids, seed=0, max_new_tokens=1, eos_token_id=[], rule="token_v3",
                   alpha=0.9, gamma=2, exact_prefix=1, engine=engine)
    first = torch.tensor([t[0] for t in out.new_tokens])
    assert chi2_pvalue(first, pT1) > 1e-3


def test_exact_prefix_engines_agree_and_cost_only_the_prefix(pair):
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, rule="token_v3", alpha=0.9, gamma=3, temperature=1.0,
              max_new_tokens=20, seed=2, eos_token_id=[])
    static = generate(*pair, ids, exact_prefix=6, engine="static", **kw)
    seq = generate(*pair, ids, exact_prefix=6, engine="sequential", **kw)
    assert static.new_tokens == seq.new_tokens
    # past the prefix the rule is the lenient one again: the tokens are not all lossless
    lossless = generate(*pair, ids, rule="spec", gamma=3, temperature=1.0, max_new_tokens=20,
                        seed=2, eos_token_id=[], attention_mask=mask)
    assert static.new_tokens != lossless.new_tokens
    with pytest.raises(ValueError, match="exact_prefix"):
        generate(*pair, ids, exact_prefix=-1, **kw)
    with pytest.raises(ValueError, match="exact_prefix"):
        generate(*pair, ids, method="token_cascade", rule="chow", exact_prefix=2)


# --- rules per sequence in the batched Engine ------------------------------------------------------
@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
def test_rows_with_different_rules_do_not_depend_on_each_other(pair, bonus):
    ids, mask = left_padded(PROMPTS + [[4, 4, 8]])
    rules = ["spec", "token_v3", "chow", "lossy"]
    alphas = [None, 0.5, 0.3, 0.2]
    exact = [0, 2, 0, 5]
    engine = Engine(*pair, max_batch_size=4, max_seq_len=64, gamma=3, bonus=bonus,
                    temperature=1.0)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=16, seed=7, rule=rules,
                          alpha=alphas, exact_prefix=exact, eos_token_id=[])
    for b in range(4):
        alone = Engine(*pair, max_batch_size=1, max_seq_len=64, gamma=3, bonus=bonus,
                       temperature=1.0, rule=rules[b], alpha=alphas[b])
        row = ids[b][mask[b].bool()][None]
        one = alone.generate(row, max_new_tokens=16, seed=7 + b, exact_prefix=exact[b],
                             eos_token_id=[])
        assert one.new_tokens[0] == out.new_tokens[b], rules[b]
        ref = generate(*pair, row, rule=rules[b], alpha=alphas[b], gamma=3, bonus=bonus,
                       temperature=1.0, max_new_tokens=16, seed=7 + b, exact_prefix=exact[b],
                       eos_token_id=[], engine="sequential")
        assert ref.new_tokens[0] == out.new_tokens[b], rules[b]
    with pytest.raises(ValueError, match="rule"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=8,
                        rule=["spec", "nope", "spec", "spec"])
    with pytest.raises(ValueError, match="alpha"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=8, rule=rules,
                        alpha=[None, 0.5, 5.0, 0.2])  # chow takes [0, 1]
