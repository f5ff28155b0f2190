"""HF's ``generate`` contract: ``speccascade_fast.hf.generate`` and the ``custom_generate`` folder.

Return types, streamers, seeds, the generation config (every supported field with HF's meaning,
the rest refused), law-changing processors applied to both models (greedy equality with HF's own
``generate`` and the sampled law against HF's processors), stopping criteria at the exact token.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, set_seed
from transformers.generation import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    TextStreamer,
    TopKLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from speccascade_fast import generate as engine_generate
from speccascade_fast import hf

from .helpers import chi2_pvalue, left_padded, tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[3, 5, 7, 9], [1, 2, 4]]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(V=48, seed=4)


def _hf_greedy(model, prompt, n, **kw):
    return model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                          pad_token_id=0, **kw)[0]


def _custom(p, *args, **kw):
    return p.generate(*args, custom_generate=str(REPO), trust_remote_code=True, **kw)


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


# --- return value -------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_matches_hf_and_returns_a_tensor(pair, gamma):
    q, p = pair
    for prompt in PROMPTS:
        out = hf.generate(p, torch.tensor([prompt]), assistant_model=q, do_sample=False,
                          max_new_tokens=15, num_assistant_tokens=gamma, deferral_rule="spec")
        assert isinstance(out, torch.Tensor) and out.dtype == torch.long
        assert torch.equal(out[0], _hf_greedy(p, prompt, 15))


def test_return_dict_in_generate_from_the_argument_or_the_config(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    out = hf.generate(p, ids, assistant_model=q, do_sample=False, max_new_tokens=6,
                      deferral_rule="spec", return_dict_in_generate=True)
    assert isinstance(out, hf.CascadeGenerateOutput)
    assert torch.equal(out.sequences[0], _hf_greedy(p, PROMPTS[0], 6))
    assert out.stats["rule"] == "spec" and out.stats["temperature"] == 0.0
    cfg = GenerationConfig(do_sample=False, max_new_tokens=6, return_dict_in_generate=True)
    out2 = hf.generate(p, ids, assistant_model=q, generation_config=cfg, deferral_rule="spec")
    assert torch.equal(out2.sequences, out.sequences)
    custom = _custom(p, ids, assistant_model=q, do_sample=False, max_new_tokens=6)
    assert isinstance(custom, torch.Tensor) and torch.equal(custom, out.sequences)


def test_argument_mapping_and_batches(pair):
    q, p = pair
    ids, mask = left_padded(PROMPTS)
    out = hf.generate(p, inputs=ids, attention_mask=mask, assistant_model=q, do_sample=True,
                      temperature=0.8, top_k=10, top_p=0.95, max_new_tokens=9,
                      num_assistant_tokens=3, lenience=0.4, seed=3, return_dict_in_generate=True)
    ref = engine_generate(q, p, ids, attention_mask=mask, rule="token_v3", alpha=0.4, gamma=3,
                          temperature=0.8, top_k=10, top_p=0.95, max_new_tokens=9, seed=3,
                          eos_token_id=[])
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats["rule"] == "token_v3" and out.stats["alpha"] == 0.4


def test_lenience_controls_pass_through(pair):
    q, p = pair
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, assistant_model=q, do_sample=True, temperature=1.0,
              max_new_tokens=9, num_assistant_tokens=3, seed=3, return_dict_in_generate=True)
    out = hf.generate(p, ids, lenience=0.6, divergence_budget=0.1, exact_prefix=2, **kw)
    ref = engine_generate(q, p, ids, attention_mask=mask, rule="token_v3", alpha=0.6, gamma=3,
                          temperature=1.0, max_new_tokens=9, seed=3, eos_token_id=[],
                          divergence_budget=0.1, exact_prefix=2)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats["divergence_budget"] == 0.1 and out.stats["exact_prefix"] == 2
    assert all(r["divergence_spent"] <= 0.1 + 1e-9 for r in out.stats["per_sequence"])


def test_no_assistant_is_plain_decoding(pair):
    _, p = pair
    out = hf.generate(p, torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=7,
                      return_dict_in_generate=True)
    assert torch.equal(out.sequences[0], _hf_greedy(p, PROMPTS[0], 7))
    assert out.stats["method"] == "autoregressive" and out.stats["drafter_calls"] == 0


# --- streamer -----------------------------------------------------------------------------------
def test_streamer_gets_the_prompt_then_every_block_then_end(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    rec = Recorder()
    out = hf.generate(p, ids, assistant_model=q, do_sample=True, max_new_tokens=14, seed=1,
                      num_assistant_tokens=3, streamer=rec, return_dict_in_generate=True)
    assert rec.puts[0] == ids.tolist() and rec.ended == 1
    streamed = [t for put in rec.puts[1:] for t in put]
    assert streamed == out.new_tokens[0]
    assert len(rec.puts) - 1 == out.stats["verifier_calls"]  # one put per verification block
    # also through model.generate(custom_generate=...), with HF's own TextStreamer-like class
    rec2 = Recorder()
    _custom(p, ids, assistant_model=q, do_sample=True, max_new_tokens=14, seed=1,
            num_assistant_tokens=3, streamer=rec2)
    assert rec2.puts == rec.puts and rec2.ended == 1


def test_streamer_ends_on_early_stop_and_on_errors(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[1]])
    first = hf.generate(p, ids, assistant_model=q, do_sample=False, max_new_tokens=10,
                        return_dict_in_generate=True).new_tokens[0]
    rec = Recorder()
    out = hf.generate(p, ids, assistant_model=q, do_sample=False, max_new_tokens=10,
                      eos_token_id=first[2], streamer=rec, return_dict_in_generate=True)
    assert out.new_tokens[0] == first[:3] and rec.ended == 1
    assert [t for put in rec.puts[1:] for t in put] == first[:3]

    calls = []

    def boom(input_ids, scores):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("processor failed")
        return scores

    rec = Recorder()
    with pytest.raises(RuntimeError, match="processor failed"):
        hf.generate(p, ids, assistant_model=q, do_sample=False, max_new_tokens=10,
                    logits_processor=LogitsProcessorList([boom]), streamer=rec)
    assert rec.ended == 1


def test_streamer_with_a_batch_gives_hfs_error(pair):
    q, p = pair
    ids, mask = left_padded(PROMPTS)

    class Tok:  # TextStreamer checks the batch before it decodes anything
        def decode(self, *a, **k):
            return ""

    with pytest.raises(ValueError, match="TextStreamer only supports batch size 1"):
        hf.generate(p, ids, attention_mask=mask, assistant_model=q, max_new_tokens=4,
                    streamer=TextStreamer(Tok()))
    with pytest.raises(ValueError, match="batch size 1"):
        hf.generate(p, ids, attention_mask=mask, assistant_model=q, max_new_tokens=4,
                    streamer=Recorder())


# --- seeds --------------------------------------------------------------------------------------
def test_seed_defaults_to_torchs_generator(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    kw = dict(assistant_model=q, do_sample=True, max_new_tokens=12)
    a, b = hf.generate(p, ids, **kw), hf.generate(p, ids, **kw)
    assert not torch.equal(a, b)  # two sampled calls differ
    set_seed(7)
    c = hf.generate(p, ids, **kw)
    set_seed(7)
    assert torch.equal(hf.generate(p, ids, **kw), c)
    # an explicit seed: exactly reproducible and batch-invariant (sequence b uses seed + b)
    ids2, mask = left_padded([PROMPTS[1], PROMPTS[0]])
    batch = hf.generate(p, ids2, attention_mask=mask, seed=10, return_dict_in_generate=True, **kw)
    alone = hf.generate(p, ids, seed=11, return_dict_in_generate=True, **kw)
    assert batch.new_tokens[1] == alone.new_tokens[0]


# --- the generation config ----------------------------------------------------------------------
def test_generation_config_is_honoured(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=12, max_new_tokens=9)
    out = hf.generate(p, ids, assistant_model=q, generation_config=cfg, seed=2,
                      return_dict_in_generate=True)
    ref = engine_generate(q, p, ids, temperature=0.7, top_k=12, max_new_tokens=9, seed=2,
                          gamma=5, eos_token_id=[])
    assert out.new_tokens == ref.new_tokens and len(out.new_tokens[0]) == 9
    # the model's own generation config when none is given
    saved = p.generation_config
    p.generation_config = cfg
    try:
        own = hf.generate(p, ids, assistant_model=q, seed=2, return_dict_in_generate=True)
    finally:
        p.generation_config = saved
    assert own.new_tokens == ref.new_tokens
    # max_length counts the prompt (HF); max_new_tokens wins over it
    n = hf.generate(p, ids, assistant_model=q, do_sample=False, max_length=10)
    assert n.shape[1] == 10
    n = hf.generate(p, ids, assistant_model=q, do_sample=False, max_length=10, max_new_tokens=3)
    assert n.shape[1] == len(PROMPTS[0]) + 3


def test_filters_switched_off_the_hf_way(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    kw = dict(assistant_model=q, do_sample=True, max_new_tokens=10, seed=4)
    plain = hf.generate(p, ids, **kw)
    assert torch.equal(hf.generate(p, ids, top_k=0, top_p=1.0, **kw), plain)


def test_unsupported_fields_raise_and_output_flags_warn(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    for field, value in (("no_repeat_ngram_size", 2), ("num_beams", 2), ("typical_p", 0.5),
                         ("num_return_sequences", 2)):
        with pytest.raises(ValueError, match=field):
            hf.generate(p, ids, assistant_model=q, max_new_tokens=2, **{field: value})
    with pytest.raises(ValueError, match="not_an_argument"):
        hf.generate(p, ids, assistant_model=q, max_new_tokens=2, not_an_argument=1)
    hf._warned.discard("output_scores")
    with pytest.warns(UserWarning, match="output_scores"):
        hf.generate(p, ids, assistant_model=q, max_new_tokens=2, output_scores=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        hf.generate(p, ids, assistant_model=q, max_new_tokens=2, output_scores=True)
        hf.generate(p, ids, assistant_model=q, max_new_tokens=2, use_cache=True)
    with pytest.raises(ValueError, match="input_ids"):
        hf.generate(p, assistant_model=q)
    with pytest.raises(ValueError, match="alpha"):
        hf.generate(p, ids, assistant_model=q, deferral_rule="chow", lenience=3.0)


# --- processors that change the law -------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.8), dict(min_new_tokens=6)],
                         ids=["repetition_penalty", "min_new_tokens"])
def test_processors_greedy_equal_hf(pair, kw):
    q, p = pair
    for prompt in PROMPTS:
        want = _hf_greedy(p, prompt, 12, **kw, eos_token_id=[prompt[-1]])
        got = hf.generate(p, torch.tensor([prompt]), assistant_model=q, do_sample=False,
                          max_new_tokens=12, num_assistant_tokens=3, deferral_rule="spec",
                          eos_token_id=[prompt[-1]], pad_token_id=0, **kw)
        assert torch.equal(got[0], want), (prompt, kw)
    custom = _custom(p, torch.tensor([PROMPTS[0]]), assistant_model=q, do_sample=False,
                     max_new_tokens=12, deferral_rule="spec", **kw)
    assert torch.equal(custom[0, :len(PROMPTS[0]) + 12],
                       _hf_greedy(p, PROMPTS[0], 12, **kw)[:len(PROMPTS[0]) + 12])


def test_processed_law_is_hfs(pair):
    """``spec`` at T = 0.9 with repetition_penalty and min_p: the second new token's law is
    HF's processors (repetition penalty, temperature, min-p) on the verifier's logits, given the
    first token (chi-squared over 3,000 sequences)."""
    q, p = pair
    N, T = 3000, 0.9
    ids = torch.tensor([PROMPTS[0]] * N)
    out = hf.generate(p, ids, assistant_model=q, do_sample=True, temperature=T, min_p=0.05,
                      repetition_penalty=1.5, max_new_tokens=2, num_assistant_tokens=2,
                      deferral_rule="spec", seed=0, return_dict_in_generate=True)
    firsts = torch.tensor([t[0] for t in out.new_tokens])
    x0 = int(torch.mode(firsts).values)  # the most frequent first token
    seconds = torch.tensor([t[1] for t in out.new_tokens if t[0] == x0])
    prefix = torch.tensor([PROMPTS[0] + [x0]])
    with torch.no_grad():
        logits = p(prefix).logits[:, -1].float()
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    scores = procs(prefix, logits) / T
    scores = MinPLogitsWarper(0.05)(prefix, scores)
    law = torch.softmax(scores.double(), -1)[0]
    assert len(seconds) > 300
    assert chi2_pvalue(seconds, law) > 1e-3


def test_plain_decoding_min_p_is_the_engines_and_hfs_law(pair):
    """Without an assistant, min_p is the engine's own truncation (batched Engine, no
    processor): the first new token's law is HF's temperature, top-k, min-p warpers."""
    _, p = pair
    N, T = 3000, 0.8
    ids = torch.tensor([PROMPTS[0]] * N)
    # engine="static" refuses a logits processor: the truncation is the Engine's own
    out = hf.generate(p, ids, do_sample=True, temperature=T, top_k=30, min_p=0.1,
                      max_new_tokens=1, seed=0, return_dict_in_generate=True, engine="static")
    with torch.no_grad():
        logits = p(torch.tensor([PROMPTS[0]])).logits[:, -1].double()
    scores = TopKLogitsWarper(30)(None, logits / T)
    law = torch.softmax(MinPLogitsWarper(0.1)(None, scores), -1)[0]
    assert int((law > 0).sum()) > 1
    assert chi2_pvalue(torch.tensor([t[0] for t in out.new_tokens]), law) > 1e-3
    # min_p = 0 is HF's no-op: off, not an error
    off = hf.generate(p, ids[:4], do_sample=True, temperature=T, min_p=0.0, max_new_tokens=3,
                      seed=1, engine="static")
    plain = hf.generate(p, ids[:4], do_sample=True, temperature=T, max_new_tokens=3, seed=1,
                        engine="static")
    assert torch.equal(off, plain)


# --- stopping criteria --------------------------------------------------------------------------
class StopOn(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_end_at_the_exact_token(pair):
    q, p = pair
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, assistant_model=q, do_sample=True, max_new_tokens=16, seed=3,
              num_assistant_tokens=4, return_dict_in_generate=True)
    full = hf.generate(p, ids, **kw)
    stop = full.new_tokens[0][5]
    cut = hf.generate(p, ids, stopping_criteria=[StopOn(stop)], **kw)
    for row, new in zip(full.new_tokens, cut.new_tokens):
        want = row[: row.index(stop) + 1] if stop in row else row
        assert new == want
    # through model.generate(custom_generate=...) too
    custom = _custom(p, ids, stopping_criteria=[StopOn(stop)], **kw)
    assert custom.new_tokens == cut.new_tokens


def test_stop_strings_with_a_tokenizer(smollm2):
    """HF's StopStringCriteria (``stop_strings`` + ``tokenizer``) on SmolLM2-135M: the text ends
    right after the first stop string, like HF's own greedy generate."""
    drafter, model, tok = smollm2
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    kw = dict(do_sample=False, max_new_tokens=24, stop_strings=["\n"], tokenizer=tok,
              pad_token_id=tok.eos_token_id)
    want = model.generate(ids, **kw)
    got = hf.generate(model, ids, assistant_model=drafter, deferral_rule="spec", **kw)
    assert torch.equal(got, want)
    pieces = [tok.decode(t) for t in got[0, ids.shape[1]:]]
    assert "\n" in pieces[-1] and not any("\n" in x for x in pieces[:-1])


# --- the custom_generate folder -----------------------------------------------------------------
def test_custom_generate_folder_follows_the_hub_convention(pair):
    q, p = pair
    folder = REPO / "custom_generate"
    assert (folder / "generate.py").is_file() and (folder / "README.md").is_file()
    reqs = (folder / "requirements.txt").read_text().split()
    assert "speccascade_fast>=0.1.0" in reqs and any(r.startswith("transformers>=5.17") for r in reqs)
    # the Hub finds custom_generate repositories by the tag in the root README's front matter
    front = (REPO / "README.md").read_text().split("---")[1]
    assert "custom_generate" in front
    prompt = torch.tensor([PROMPTS[1]])
    out = _custom(p, input_ids=prompt, assistant_model=q, do_sample=False, max_new_tokens=12,
                  deferral_rule="token_v3", lenience=-0.5, num_assistant_tokens=3,
                  return_dict_in_generate=True)
    assert torch.equal(out.sequences[0], _hf_greedy(p, PROMPTS[1], 12))
    assert out.stats["rule"] == "token_v3" and out.stats["gamma"] == 3


def test_assistant_confidence_threshold_is_draft_confidence(pair):
    """HF's ``assistant_confidence_threshold`` maps to ``draft_confidence`` (0 or None: off),
    from the argument or the assistant's generation config."""
    q, p = pair
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=12, seed=2)
    ref = engine_generate(q, p, ids, rule="spec", gamma=4, temperature=1.0,
                          draft_confidence=0.3, eos_token_id=[], **kw)
    fixed = engine_generate(q, p, ids, rule="spec", gamma=4, temperature=1.0, eos_token_id=[],
                            **kw)
    assert ref.stats["drafted"] < fixed.stats["drafted"]  # the cut-off is in effect
    hf_kw = dict(assistant_model=q, do_sample=True, num_assistant_tokens=4, deferral_rule="spec",
                 return_dict_in_generate=True, **kw)
    out = hf.generate(p, ids, assistant_confidence_threshold=0.3, **hf_kw)
    assert out.new_tokens == ref.new_tokens and out.stats["drafted"] == ref.stats["drafted"]
    off = hf.generate(p, ids, assistant_confidence_threshold=0.0, **hf_kw)
    assert off.stats["drafted"] == fixed.stats["drafted"]
    saved = q.generation_config.assistant_confidence_threshold
    q.generation_config.assistant_confidence_threshold = 0.3
    try:
        custom = _custom(p, ids, **hf_kw)
    finally:
        q.generation_config.assistant_confidence_threshold = saved
    assert custom.new_tokens == ref.new_tokens


# --- what review found --------------------------------------------------------------------------
def test_hfs_config_merge_eos_pad_and_default_top_k(pair):
    """A passed generation_config's unset fields come from the model's config, then from HF's
    defaults (top_k 50 when sampling), and the pad is the first EOS id, as in HF."""
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    saved = p.generation_config
    p.generation_config = GenerationConfig(eos_token_id=[7, 3])
    try:
        want = p.generate(ids, generation_config=GenerationConfig(max_new_tokens=12),
                          do_sample=False)
        got = hf.generate(p, ids, assistant_model=q, deferral_rule="spec",
                          generation_config=GenerationConfig(max_new_tokens=12))
    finally:
        p.generation_config = saved
    assert torch.equal(got, want)


def test_padded_batches_count_min_new_tokens_like_hf(pair):
    q, p = pair
    ids, mask = left_padded([[3, 5, 7, 9, 11], [1, 2]])
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=3,
              repetition_penalty=1.3, pad_token_id=0)
    first = hf.generate(p, ids, assistant_model=q, deferral_rule="spec",
                        **dict(kw, min_new_tokens=0))
    eos = int(first[1, ids.shape[1] + 3])  # stop the short row right after min_new_tokens
    want = p.generate(ids, eos_token_id=eos, **kw)
    got = hf.generate(p, ids, assistant_model=q, deferral_rule="spec", eos_token_id=eos, **kw)
    assert torch.equal(got, want)


def test_batch_streamer_error_still_ends_it_and_hf_fields_named(pair):
    q, p = pair
    ids, mask = left_padded(PROMPTS)
    rec = Recorder()
    with pytest.raises(ValueError, match="batch size 1"):
        hf.generate(p, ids, attention_mask=mask, assistant_model=q, streamer=rec)
    assert rec.ended == 1
    one = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="num_assistant_tokens"):
        hf.generate(p, one, assistant_model=q, num_assistant_tokens=0)
    with pytest.raises(ValueError, match="assistant_confidence_threshold"):
        hf.generate(p, one, assistant_model=q, assistant_confidence_threshold=1.5)
    with pytest.raises(ValueError, match="temperature"):
        hf.generate(p, one, assistant_model=q, do_sample=True, temperature=0.0)
    # HF's own no-op values are not "unsupported fields"
    hf.generate(p, one, assistant_model=q, max_new_tokens=2, typical_p=1.0,
                no_repeat_ngram_size=0, num_beams=1, min_length=0)
