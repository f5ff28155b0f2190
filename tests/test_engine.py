"""The batched static-cache Engine against the sequential engine (its oracle), on tiny models.

* same tokens and same statistics (``drafter_calls`` aside: the Engine drafts gamma tokens in
  every block) for every method it runs, lossless and lossy rules, T = 0 and T > 0, top-k/top-p,
  both bonus policies, EOS inside blocks, prompts of different lengths;
* a sequence's tokens do not depend on its batch, with per-sequence seed, temperature, alpha and
  budget; finished sequences leave the batch; an Engine is reusable;
* Qwen2 (SDPA, boolean masks) and Gemma-2 (eager, additive masks) with sliding-window layers;
* bad inputs raise ValueError naming the argument.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from speccascade_fast import Engine, generate

from .helpers import PROMPTS, left_padded, noisy_copy_pair, qwen2_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


COUNTS = ("tokens", "verifier_calls", "drafted", "accepted", "rejected", "deferred", "blocks",
          "sequences")

CASES = [
    dict(rule="spec", temperature=0.0),
    dict(rule="spec", temperature=1.0, bonus="verifier"),
    dict(rule="token_v3", alpha=0.3, temperature=1.0),
    dict(rule="token_v3", alpha=0.5, temperature=0.0, gamma=8),
    dict(rule="lossy", alpha=0.2, temperature=0.7, bonus="verifier", gamma=4),
    dict(rule="opt", alpha=0.1, temperature=1.0, gamma=1),
    dict(rule="chow", alpha=0.3, temperature=1.0, top_k=8),
    dict(rule="diff", alpha=0.0, temperature=0.5, top_p=0.9, bonus="verifier"),
    dict(rule="lossy_star", alpha=0.3, temperature=1.0, gamma=3),
    dict(method="autoregressive", temperature=1.0),
    dict(method="drafter_only", temperature=0.8),
]


def _both(models, ids, mask, **kw):
    return [generate(*models, ids, attention_mask=mask, engine=e, **kw)
            for e in ("static", "sequential")]


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_static_equals_sequential(pair, kw, with_eos):
    ids, mask = left_padded(PROMPTS)
    run = dict(max_new_tokens=21, seed=11, **kw)
    eos = []
    if with_eos:  # two tokens the free run emits mid-way: rows stop inside blocks
        free = generate(*pair, ids, attention_mask=mask, eos_token_id=[], engine="sequential",
                        **run).new_tokens
        eos = [free[0][7], free[2][12]]
    static, seq = _both(pair, ids, mask, eos_token_id=eos, **run)
    assert static.new_tokens == seq.new_tokens
    assert torch.equal(static.sequences, seq.sequences)
    for k in COUNTS:
        assert static.stats[k] == seq.stats[k], k
    if with_eos:
        assert len(static.new_tokens[0]) <= 8 and len(static.new_tokens[2]) <= 13
    # the prompts' prefill is timed, and is part of the whole call's time
    assert 0 < static.stats["prefill_s"] < static.stats["wall_s"]


ADAPTIVE_CASES = [
    dict(rule="spec", temperature=0.0),
    dict(rule="spec", temperature=1.0),
    dict(rule="token_v3", alpha=0.3, temperature=1.0),
    dict(rule="lossy", alpha=0.2, temperature=0.7, bonus="verifier", gamma=4),
    dict(rule="chow", alpha=0.3, temperature=1.0, top_k=8, gamma=3),
]


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("kw", ADAPTIVE_CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_draft_confidence_static_equals_sequential(pair, kw, with_eos):
    """``draft_confidence``: each row of the batch stops drafting where the sequential engine
    does (same tokens, same drafts, blocks and acceptances), and the blocks really vary."""
    ids, mask = left_padded(PROMPTS)
    run = dict(max_new_tokens=21, seed=11, draft_confidence=0.2, **kw)
    eos = []
    if with_eos:
        free = generate(*pair, ids, attention_mask=mask, eos_token_id=[], engine="sequential",
                        **run).new_tokens
        eos = [free[0][7], free[2][12]]
    static, seq = _both(pair, ids, mask, eos_token_id=eos, **run)
    assert static.new_tokens == seq.new_tokens
    for k in COUNTS:
        assert static.stats[k] == seq.stats[k], k
    gamma = kw.get("gamma", 5)
    assert static.stats["blocks"] < static.stats["drafted"] < gamma * static.stats["blocks"]


@pytest.mark.parametrize("draft_confidence", [None, 0.2])
@pytest.mark.parametrize("rule,alpha", [("token_v3", 0.3), ("chow", 0.6)])
def test_bonus_drafter_step_runs_only_after_full_acceptance(pair, rule, alpha, draft_confidence):
    """``bonus="cascade"``: q at the bonus position costs a drafter call only in blocks that
    accepted every draft and keep their bonus token. Alone in its batch, a sequence makes the
    same drafter calls on both engines (but for the fixed blocks' drafts past the budget)."""
    gamma = 3
    kw = dict(rule=rule, alpha=alpha, gamma=gamma, temperature=1.0, max_new_tokens=40, seed=7,
              eos_token_id=[], draft_confidence=draft_confidence)
    ids = torch.tensor([PROMPTS[2]])
    static, seq = _both(pair, ids, None, **kw)
    assert static.new_tokens == seq.new_tokens
    s = seq.stats
    full = s["blocks"] - s["rejected"]  # blocks whose drafts were all accepted
    assert 0 < full < s["blocks"]
    # one bonus step per full block, but for a last block whose bonus the budget cuts
    assert full - 1 <= s["drafter_calls"] - s["drafted"] <= full
    past_budget = 0 if draft_confidence else gamma * s["blocks"] - s["drafted"]
    assert static.stats["drafter_calls"] == s["drafter_calls"] + past_budget


@pytest.mark.parametrize("engine", ["static", "sequential"])
def test_spec_skips_the_bonus_drafter_step(pair, engine):
    """Under ``spec`` the bonus law is pT whatever q is: ``bonus="cascade"`` runs no extra
    drafter step and draws exactly the tokens of ``bonus="verifier"``."""
    ids, mask = left_padded(PROMPTS)
    kw = dict(rule="spec", temperature=1.0, gamma=3, max_new_tokens=20, seed=4, eos_token_id=[],
              engine=engine)
    cascade = generate(*pair, ids, attention_mask=mask, bonus="cascade", **kw)
    verifier = generate(*pair, ids, attention_mask=mask, bonus="verifier", **kw)
    assert cascade.new_tokens == verifier.new_tokens
    assert cascade.stats["drafter_calls"] == verifier.stats["drafter_calls"]


@pytest.mark.parametrize("draft_confidence", [None, 0.2])
def test_batch_equals_single_with_per_sequence_settings(pair, draft_confidence):
    """Per-sequence seed, temperature, alpha and budget; a row's tokens are its own (with
    ``draft_confidence`` too: each row stops drafting on its own)."""
    engine = Engine(*pair, max_batch_size=3, max_seq_len=48, rule="token_v3", gamma=4,
                    draft_confidence=draft_confidence)
    ids, mask = left_padded(PROMPTS)
    settings = dict(seed=[5, 9, 2], temperature=[0.0, 0.7, 1.0], alpha=[0.1, 0.4, 0.8],
                    max_new_tokens=[6, 19, 30])
    batch = engine.generate(ids, attention_mask=mask, eos_token_id=[], **settings)
    assert [len(n) for n in batch.new_tokens] == [6, 19, 30]
    for b, prompt in enumerate(PROMPTS):
        alone = engine.generate(torch.tensor([prompt]), eos_token_id=[],
                                **{k: [v[b]] for k, v in settings.items()})
        assert alone.new_tokens[0] == batch.new_tokens[b], b
        ref = generate(*pair, torch.tensor([prompt]), rule="token_v3", gamma=4,
                       draft_confidence=draft_confidence,
                       eos_token_id=[], engine="sequential", seed=settings["seed"][b],
                       temperature=settings["temperature"][b], alpha=settings["alpha"][b],
                       max_new_tokens=settings["max_new_tokens"][b])
        assert ref.new_tokens[0] == batch.new_tokens[b], b
    again = engine.generate(ids, attention_mask=mask, eos_token_id=[], **settings)
    assert again.new_tokens == batch.new_tokens  # the caches' stale contents never leak


@pytest.mark.parametrize("drafter_weights", [None, "q4"])
def test_compiled_drafter_steps_give_the_eager_tokens(pair, drafter_weights):
    """``compile_drafter``: the drafter's one-token steps run torch.compile'd (dynamic shapes),
    in a batch whose rows finish at different times; the same tokens as eager (fp32 models;
    and a drafter with quantised linear layers, each one operator in the compiled graph)."""
    if drafter_weights:
        from speccascade_fast.quantize import quantize_model

        pair = (quantize_model(copy.deepcopy(pair[0]), drafter_weights), pair[1])
    ids, mask = left_padded(PROMPTS)
    settings = dict(seed=[3, 4, 5], max_new_tokens=[5, 17, 24], eos_token_id=[],
                    attention_mask=mask)
    kw = dict(max_batch_size=3, max_seq_len=48, rule="token_v3", alpha=0.3, gamma=4,
              temperature=1.0)
    eager = Engine(*pair, **kw).generate(ids, **settings)
    engine = Engine(*pair, compile_drafter=True, **kw)
    assert engine.q.step_model is not engine.q.model
    torch._dynamo.utils.counters.clear()
    out = engine.generate(ids, **settings)
    assert not torch._dynamo.utils.counters["graph_break"]  # one graph per compiled step
    assert out.new_tokens == eager.new_tokens
    assert out.stats["drafter_calls"] == eager.stats["drafter_calls"]
    with pytest.raises(ValueError, match="compile_drafter"):
        Engine(*pair, compile_drafter="yes")


def test_finished_sequences_leave_the_batch(pair):
    drafter, verifier = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    rows = {"drafter": [], "verifier": []}
    for name, m in (("drafter", drafter), ("verifier", verifier)):
        m.register_forward_hook(lambda mod, args, out, name=name: rows[name].append(
            out.logits.shape[0]))
    engine = Engine(drafter, verifier, max_batch_size=3, max_seq_len=64, rule="spec", gamma=3)
    ids, mask = left_padded(PROMPTS)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=[2, 9, 40], eos_token_id=[])
    assert [len(n) for n in out.new_tokens] == [2, 9, 40]
    for name in rows:
        assert rows[name][0] == 3 and rows[name][-1] == 1
        assert rows[name] == sorted(rows[name], reverse=True)  # never grows back
    # the verifier's work: the prefill (all rows), then one row-call per block of each
    # sequence, nothing for finished ones
    assert sum(rows["verifier"][1:]) == out.stats["verifier_calls"] == out.stats["blocks"]


def _gemma2_pair():
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       sliding_window=4, max_position_embeddings=128, initializer_range=0.3)
    return noisy_copy_pair(Gemma2ForCausalLM, cfg)


@pytest.mark.parametrize("make", [qwen2_pair, _gemma2_pair], ids=["qwen2-sdpa", "gemma2-eager"])
def test_sliding_window_models(make):
    """Windows of 4 tokens: the Engine's own masks must match HF's for both layer types."""
    models = make()
    assert "sliding_attention" in models[1].config.layer_types
    ids, mask = left_padded(PROMPTS)
    for kw in (dict(temperature=0.0, rule="spec"), dict(temperature=1.0, rule="token_v3")):
        static, seq = _both(models, ids, mask, max_new_tokens=16, seed=1, eos_token_id=[],
                            gamma=3, **kw)
        assert static.new_tokens == seq.new_tokens, kw


def test_bad_inputs_raise(pair):
    q, p = pair  # max_position_embeddings = 256
    engine = Engine(q, p, max_batch_size=2, max_seq_len=32)
    ids = torch.tensor([[1, 2, 3]])
    bad_calls = [
        (dict(max_new_tokens=30), "max_seq_len"),
        (dict(input_ids=torch.ones(3, 2, dtype=torch.long)), "max_batch_size"),
        (dict(max_new_tokens=[4, 4]), "max_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=[0.5, 0.5]), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(seed=[1, 2]), "seed"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    ]
    for kw, needle in bad_calls:
        args = dict(input_ids=ids, max_new_tokens=8)
        args.update(kw)
        with pytest.raises(ValueError, match=needle):
            engine.generate(args.pop("input_ids"), **args)
    bad_engines = [
        (dict(max_seq_len=257), "context"),
        (dict(max_seq_len=1), "max_seq_len"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(method="token_cascade"), "Engine"),
        (dict(gamma=0), "gamma"),
        (dict(rule="chow", alpha=2.0), "alpha"),
        (dict(draft_confidence=1.5), "draft_confidence"),
        (dict(method="autoregressive", draft_confidence=0.5), "draft_confidence"),
    ]
    for kw, needle in bad_engines:
        with pytest.raises(ValueError, match=needle):
            Engine(q, p, **kw)
    flash = copy.deepcopy(p)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        Engine(q, flash)
    with pytest.raises(ValueError, match="attn_implementation"):
        generate(q, flash, ids, engine="static")
    with pytest.raises(ValueError, match="engine"):
        generate(q, p, ids, engine="fast")
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32,
                                             num_layers=1, num_heads=2,
                                             decoder_start_token_id=0))
    with pytest.raises(ValueError, match="encoder-decoder"):
        Engine(t5, t5)
    with pytest.raises(ValueError, match="token_cascade"):
        generate(q, p, ids, method="token_cascade", engine="static")


def test_kv_cache_argument_under_either_name():
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` (the old name
    deprecated): both engines pass the cache under whichever name the model takes, and the
    static engine refuses a model that takes neither, saying so."""
    from speccascade_fast.engine import unsupported_reason
    from speccascade_fast.model_facts import cache_kwarg

    class Model(torch.nn.Module):
        def __init__(self, forward):
            super().__init__()
            self.config = type("Config", (), {"_attn_implementation": "sdpa"})()
            self.forward = forward

    def new(input_ids=None, position_ids=None, cache=None, **kwargs): ...
    def old(input_ids=None, position_ids=None, past_key_values=None): ...
    def none(input_ids=None, position_ids=None): ...

    assert cache_kwarg(Model(new)) == "cache"
    assert cache_kwarg(Model(old)) == "past_key_values"
    assert cache_kwarg(Model(none)) is None
    assert unsupported_reason(Model(new)) is None and unsupported_reason(Model(old)) is None
    assert "no position_ids / KV cache" in unsupported_reason(Model(none))


# --- a prompt prefix every row shares is prefilled once ----------------------------------------
def _few_shot_prompts(n_shared=24):
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(1, 60, (n_shared,), generator=g).tolist()
    tails = [[5, 9, 11], [7], [3, 3, 8, 2, 14, 6]]
    return [shared + t for t in tails]


def test_shared_prefix_length():
    from speccascade_fast.engine import shared_prefix

    p = [torch.tensor(x) for x in ([1, 2, 3, 4], [1, 2, 3], [1, 2, 9, 4])]
    assert shared_prefix(p, 10) == 2 and shared_prefix(p[:2], 10) == 3
    assert shared_prefix(p[:2], 1) == 1 and shared_prefix([p[0], torch.tensor([7])], 3) == 0


@pytest.mark.parametrize("heads_last", [False, True], ids=["sdpa", "flash-attn-layout"])
@pytest.mark.parametrize("kw", [dict(rule="spec", temperature=0.0),
                                dict(rule="token_v3", alpha=0.3, temperature=1.0),
                                dict(method="autoregressive", temperature=1.0)],
                         ids=["spec-T0", "token_v3-T1", "verifier-T1"])
def test_a_shared_prefix_is_fed_once_with_the_same_tokens(pair, request, monkeypatch, kw,
                                                          heads_last):
    """Prompts sharing 24 tokens: the prefix is fed once (one one-row call per model) and
    copied; every row's tokens are those of the unshared prefill and of the prompt alone."""
    from speccascade_fast import engine as engine_mod
    from speccascade_fast import kv_cache

    if heads_last:
        request.getfixturevalue("flash_stand_in")
    prompts = _few_shot_prompts()
    ids, mask = left_padded(prompts)
    kw = dict(kw, max_new_tokens=14, seed=3, eos_token_id=[])
    attention = "flash_attn" if heads_last else None
    engine = Engine(*pair, max_batch_size=3, max_seq_len=64, attention=attention,
                    gamma=3, **{k: v for k, v in kw.items() if k in ("method", "rule")})
    run = {k: v for k, v in kw.items() if k not in ("method", "rule")}
    calls = []
    monkeypatch.setattr(kv_cache.SlotModel, "prefill_shared", _counting(
        kv_cache.SlotModel.prefill_shared, calls))
    shared = engine.generate(ids, attention_mask=mask, **run)
    assert shared.stats["shared_prefix_tokens"] == 24
    assert len(calls) == (1 if kw.get("method") == "autoregressive" else 2)  # one per model
    monkeypatch.setattr(engine_mod, "MIN_SHARED_PREFIX", 10_000)
    plain = engine.generate(ids, attention_mask=mask, **run)
    assert plain.stats["shared_prefix_tokens"] == 0
    assert shared.new_tokens == plain.new_tokens
    for b, prompt in enumerate(prompts):
        alone = engine.generate(torch.tensor([prompt]), **dict(run, seed=3 + b))
        assert alone.new_tokens[0] == shared.new_tokens[b], b


@pytest.mark.parametrize("heads_last", [False, True], ids=["sdpa", "flash-attn-layout"])
def test_a_shared_prefix_is_reused_by_later_calls(pair, request, monkeypatch, heads_last):
    """A later call whose shared prefix starts with the previous one's copies those slots
    instead of feeding them; its tokens are a fresh engine's. A prefix that differs is fed
    (only the common part is reused), and becomes the kept one."""
    from speccascade_fast import kv_cache

    if heads_last:
        request.getfixturevalue("flash_stand_in")
    attention = "flash_attn" if heads_last else None

    def engine():
        return Engine(*pair, max_batch_size=3, max_seq_len=80, attention=attention,
                      rule="token_v3", alpha=0.3, gamma=3)

    run = dict(max_new_tokens=10, seed=11, eos_token_id=[], temperature=1.0)
    first = _few_shot_prompts()
    later = [p[:24] + [4, 4, 2] + p[24:] for p in first[:2]]  # same 24, then 2 more shared
    other = [[60] * 4 + p[4:] for p in first]  # differs from the first token on (60 > any)
    e = engine()
    assert e.generate(*left_padded(first), **run).stats["prefix_reused_tokens"] == 0
    fed = []
    with monkeypatch.context() as mp:
        mp.setattr(kv_cache.SlotModel, "forward", _counting(kv_cache.SlotModel.forward, fed))
        out = e.generate(*left_padded(later), **run)
    assert out.stats["shared_prefix_tokens"] == 27 and out.stats["prefix_reused_tokens"] == 24
    # the kept 24 are not fed again: each model feeds slots 24..26 alone, then the rest
    assert not any(int(sl[0, 0]) == 0 and sl.shape[0] == 1 for sl in fed)
    assert sum(sl.shape == (1, 3) and int(sl[0, 0]) == 24 for sl in fed) == 2
    assert out.new_tokens == engine().generate(*left_padded(later), **run).new_tokens
    out = e.generate(*left_padded(other), **run)
    assert out.stats["shared_prefix_tokens"] == 24 and out.stats["prefix_reused_tokens"] == 0
    assert out.new_tokens == engine().generate(*left_padded(other), **run).new_tokens
    again = e.generate(*left_padded(other), **run)  # the kept prefix is now ``other``'s
    assert again.stats["prefix_reused_tokens"] == 24 and again.new_tokens == out.new_tokens


def test_no_sharing_below_the_minimum_or_for_one_row(pair):
    engine = Engine(*pair, max_batch_size=3, max_seq_len=64, rule="spec", gamma=3)
    ids, mask = left_padded(PROMPTS)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    assert out.stats["shared_prefix_tokens"] == 0
    one = engine.generate(torch.tensor([_few_shot_prompts()[0]]), max_new_tokens=4,
                          eos_token_id=[])
    assert one.stats["shared_prefix_tokens"] == 0


def _counting(fn, calls):
    def wrapped(*a, **kw):
        calls.append(a[2])
        return fn(*a, **kw)
    return wrapped


def test_goodput_confidence_reads_each_rows_drafter_confidence(pair):
    """The predictor is told, per sequence, the drafter's largest probability at each verified
    draft position: the same numbers a forward of the drafter over the row's final text gives,
    with rows leaving the batch at different times (unequal budgets)."""
    drafter, verifier = pair
    ids, mask = left_padded(PROMPTS)
    engine = Engine(drafter, verifier, max_batch_size=3, max_seq_len=64, gamma=3,
                    rule="token_v3", alpha=0.3, temperature=0.0,
                    gamma_policy="goodput_confidence")  # bonus "cascade": every block drafts
    seen: dict[int, list[float]] = {}
    observe = engine._confidence.observe

    def spy(seq, confidence, drafted, accepted):
        from speccascade_fast.goodput import verified_positions
        seen.setdefault(seq, []).extend(confidence[: verified_positions(drafted, accepted)])
        # a block emits its accepted drafts and one more token: the next block starts there
        seen[seq] += [None] * (accepted + 1 - verified_positions(drafted, accepted))
        observe(seq, confidence, drafted, accepted)

    engine._confidence.observe = spy
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=[6, 14, 20],
                          eos_token_id=[])
    assert out.stats["acceptance_log_loss"]["positions"] > 0
    for seq, prompt in enumerate(PROMPTS):
        new = out.new_tokens[seq]
        text = torch.tensor([prompt + new])
        with torch.no_grad():
            probs = torch.softmax(drafter(text).logits[0].float(), -1).amax(-1)
        want = probs[len(prompt) - 1: len(prompt) - 1 + len(new)]  # position i: before new[i]
        got = seen[seq][: len(new)]
        checked = [(g, w) for g, w in zip(got, want.tolist()) if g is not None]
        assert len(checked) >= len(new) // 2, seq
        for g, w in checked:
            assert g == pytest.approx(w, abs=1e-4), seq


def _forward_count(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_an_adaptive_engine_that_never_drafts_never_runs_the_drafter(pair):
    """Where the controller may choose plain verifier steps, the drafter's prefill waits for the
    call's first drafting block: a call whose every block is a plain step never runs the
    drafter, and emits the verifier's own greedy text."""
    drafter, verifier = map(copy.deepcopy, pair)
    calls = _forward_count(drafter)
    ids, mask = left_padded(PROMPTS)
    engine = Engine(drafter, verifier, max_batch_size=3, max_seq_len=64, gamma=3, rule="spec",
                    temperature=0.0, gamma_policy="goodput")
    # a controller that has measured drafting as far too slow at this batch size
    engine._goodput.times.update({(3, 0): 1e-3, (3, 1): 1.0, (3, 3): 3.0})
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    alone = generate(*pair, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[],
                     method="autoregressive", temperature=0.0)
    assert out.stats["gammas"] == [0] * 6 and calls[0] == 0
    assert out.stats["drafter_calls"] == 0 and out.new_tokens == alone.new_tokens


@pytest.mark.parametrize("policy", ["fixed", "goodput"])
def test_the_drafters_prefill_is_not_counted_as_a_drafter_call(pair, policy):
    """Eager (fixed gamma) or deferred to the first drafting block (goodput), the drafter's
    prefill is one forward call outside ``drafter_calls``, and its time is in ``prefill_s``;
    the deferred one gives the same greedy text."""
    drafter, verifier = map(copy.deepcopy, pair)
    calls = _forward_count(drafter)
    prompt = torch.tensor([PROMPTS[1]])
    engine = Engine(drafter, verifier, max_seq_len=64, gamma=3, rule="spec", temperature=0.0,
                    gamma_policy=policy)
    out = engine.generate(prompt, max_new_tokens=12, eos_token_id=[])
    alone = generate(*pair, prompt, max_new_tokens=12, eos_token_id=[],
                     method="autoregressive", temperature=0.0)
    assert out.new_tokens == alone.new_tokens
    if policy == "goodput":  # the controller explores gamma = 3 first: the drafter ran
        assert out.stats["gammas"][0] == 3 and engine._lazy_drafter
        assert engine._goodput.prefill_rate > 0  # the deferred prefill, timed
        assert engine._goodput.catch_up(10, prefill=True) > 0
    assert calls[0] == out.stats["drafter_calls"] + 1
    assert out.stats["prefill_s"] >= engine._late_prefill_s
    assert (engine._late_prefill_s > 0) == (policy == "goodput")


def test_a_deferred_drafter_prefill_with_rows_leaving_and_a_shared_prefix(pair):
    """Plain steps first, then drafting: the deferred prefill feeds the drafter the shared
    prefix once and every row's prompt and emitted tokens, after a row has left the batch;
    every row's text is the verifier's greedy one, in two calls of one engine; a per-call rule
    that cannot take plain steps drafts from the first block."""
    drafter, verifier = map(copy.deepcopy, pair)
    prefix = list(range(3, 23))  # 20 tokens every prompt starts with
    prompts = [prefix + p for p in PROMPTS]
    ids, mask = left_padded(prompts)
    engine = Engine(drafter, verifier, max_batch_size=3, max_seq_len=64, gamma=3, rule="spec",
                    temperature=0.0, gamma_policy="goodput")
    kw = dict(attention_mask=mask, max_new_tokens=[2, 9, 14], eos_token_id=[])
    alone = generate(*pair, ids, attention_mask=mask, max_new_tokens=14, eos_token_id=[],
                     method="autoregressive", temperature=0.0)
    alone = [t[:n] for t, n in zip(alone.new_tokens, kw["max_new_tokens"])]
    shared = []
    prefill_shared = engine.q.prefill_shared
    engine.q.prefill_shared = lambda tokens, n: shared.append(n) or prefill_shared(tokens, n)
    for call in range(2):
        schedule = iter([0, 0, 0] + [3] * 20)  # row 0 (2 tokens) leaves during the plain steps
        engine._goodput.choose = lambda *a, s=schedule, **k: next(s)
        out = engine.generate(ids, **kw)
        assert out.new_tokens == alone and out.stats["gammas"][:4] == [0, 0, 0, 3]
        assert shared == [20] * (call + 1) and out.stats["shared_prefix_tokens"] == 20
        # the second call copies the prefix from the first's, in both models
        assert out.stats["prefix_reused_tokens"] == (20 if call else 0)
    del engine._goodput.choose
    # token_v3 under bonus "cascade" cannot take plain steps: its first block drafts
    out = engine.generate(ids, rule="token_v3", alpha=0.0, **kw)
    assert out.stats["gammas"][0] >= 1 and out.new_tokens == alone
