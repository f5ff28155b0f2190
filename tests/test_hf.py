"""HF-style entry points: ``speccascade_fast.hf.generate`` and the ``custom_generate`` folder."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from speccascade_fast import hf
from speccascade_fast.engine import generate as engine_generate

from .helpers import left_padded, tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[3, 5, 7, 9], [1, 2, 4]]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(V=48, seed=4)


def _hf_greedy(model, prompt, n):
    return model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                          pad_token_id=0)[0]


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_matches_hf(pair, gamma):
    q, p = pair
    for prompt in PROMPTS:
        out = hf.generate(p, torch.tensor([prompt]), assistant_model=q, do_sample=False,
                          max_new_tokens=15, num_assistant_tokens=gamma, deferral_rule="spec")
        assert isinstance(out, hf.CascadeGenerateOutput)
        assert torch.equal(out.sequences[0], _hf_greedy(p, prompt, 15))
        assert out.stats["gamma"] == gamma and out.stats["rule"] == "spec"
        assert out.stats["temperature"] == 0.0


def test_argument_mapping(pair):
    q, p = pair
    ids, mask = left_padded(PROMPTS)
    out = hf.generate(p, inputs=ids, attention_mask=mask, assistant_model=q, do_sample=True,
                      temperature=0.8, top_k=10, top_p=0.95, max_new_tokens=9,
                      num_assistant_tokens=3, lenience=0.4, seed=3)
    ref = engine_generate(q, p, ids, attention_mask=mask, rule="token_v3", alpha=0.4, gamma=3,
                          temperature=0.8, top_k=10, top_p=0.95, max_new_tokens=9, seed=3)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats["rule"] == "token_v3" and out.stats["alpha"] == 0.4
    tensor = hf.generate(p, ids, attention_mask=mask, assistant_model=q, do_sample=True,
                         temperature=0.8, top_k=10, top_p=0.95, max_new_tokens=9,
                         num_assistant_tokens=3, lenience=0.4, seed=3,
                         return_dict_in_generate=False)
    assert torch.equal(tensor, ref.sequences)


def test_no_assistant_is_plain_decoding(pair):
    _, p = pair
    out = hf.generate(p, torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=7)
    assert torch.equal(out.sequences[0], _hf_greedy(p, PROMPTS[0], 7))
    assert out.stats["method"] == "autoregressive" and out.stats["drafter_calls"] == 0


def test_unsupported_arguments_warn_and_bad_ones_raise(pair):
    q, p = pair
    ids = torch.tensor([PROMPTS[0]])
    with pytest.warns(UserWarning, match="streamer"):
        hf.generate(p, ids, assistant_model=q, max_new_tokens=2, streamer=object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.generate(p, ids, assistant_model=q, max_new_tokens=2, use_cache=True, streamer=None)
    with pytest.raises(ValueError, match="input_ids"):
        hf.generate(p, assistant_model=q)
    with pytest.raises(ValueError, match="alpha"):
        hf.generate(p, ids, assistant_model=q, deferral_rule="chow", lenience=3.0)


def test_custom_generate_folder(pair):
    """``model.generate(custom_generate=<folder holding custom_generate/>)`` runs our engine."""
    q, p = pair
    assert (REPO / "custom_generate" / "generate.py").is_file()
    assert (REPO / "custom_generate" / "README.md").is_file()
    prompt = torch.tensor([PROMPTS[1]])
    out = p.generate(input_ids=prompt, assistant_model=q, custom_generate=str(REPO),
                     trust_remote_code=True, do_sample=False, max_new_tokens=12,
                     deferral_rule="token_v3", lenience=-0.5, num_assistant_tokens=3)
    assert torch.equal(out.sequences[0], _hf_greedy(p, PROMPTS[1], 12))
    assert out.stats["rule"] == "token_v3" and out.stats["gamma"] == 3
    assert out.stats["verifier_calls"] < 12
    sampled = p.generate(prompt, assistant_model=q, custom_generate=str(REPO),
                         trust_remote_code=True, do_sample=True, max_new_tokens=6, seed=5)
    ref = engine_generate(q, p, prompt, temperature=1.0, max_new_tokens=6, seed=5)
    assert torch.equal(sampled.sequences, ref.sequences)


def test_assistant_confidence_threshold_is_draft_confidence(pair):
    """HF's ``assistant_confidence_threshold`` maps to ``draft_confidence`` (0 or None: off),
    in ``hf.generate`` and, read from the assistant's generation config, in custom_generate."""
    q, p = pair
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=12, seed=2)
    ref = engine_generate(q, p, ids, rule="spec", gamma=4, temperature=1.0,
                          draft_confidence=0.3, **kw)
    fixed = engine_generate(q, p, ids, rule="spec", gamma=4, temperature=1.0, **kw)
    assert ref.stats["drafted"] < fixed.stats["drafted"]  # the cut-off is in effect
    hf_kw = dict(assistant_model=q, do_sample=True, num_assistant_tokens=4, deferral_rule="spec",
                 **kw)
    out = hf.generate(p, ids, assistant_confidence_threshold=0.3, **hf_kw)
    assert out.new_tokens == ref.new_tokens and out.stats["drafted"] == ref.stats["drafted"]
    off = hf.generate(p, ids, assistant_confidence_threshold=0.0, **hf_kw)
    assert off.stats["drafted"] == fixed.stats["drafted"]
    saved = q.generation_config.assistant_confidence_threshold
    q.generation_config.assistant_confidence_threshold = 0.3
    try:
        custom = p.generate(ids, custom_generate=str(REPO), trust_remote_code=True, **hf_kw)
    finally:
        q.generation_config.assistant_confidence_threshold = saved
    assert custom.new_tokens == ref.new_tokens
