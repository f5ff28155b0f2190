"""The end-to-end benchmark (``speccascade bench``) on tiny models: every configuration runs,
decodes the same number of tokens, and the derived figures follow from the measured ones."""
from __future__ import annotations

import pytest
import torch

from speccascade_fast.bench import e2e

from .test_engine import tiny_pair


@pytest.fixture(scope="module")
def result():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    q, p = tiny_pair()
    prompts = [torch.tensor([3, 5, 7, 9]), torch.tensor([1, 2]), torch.tensor([10, 20, 30])]
    try:
        yield e2e.run(q, p, prompts=prompts, max_new_tokens=12, batch=2, gamma=3,
                      int8_drafter=True, progress=lambda s: None)
    finally:
        torch.set_num_threads(old)


def test_every_configuration_decodes_the_same_work(result):
    names = {(r.name, r.batch) for r in result["rows"]}
    for name in ("ours:verifier", "ours:spec greedy", "ours:token_v3 a=0.3 T=1"):
        assert (name, 1) in names and (name, 2) in names
    for name in ("hf:verifier greedy", "hf:assisted greedy", "hf:assisted T=1", "ours:drafter"):
        assert (name, 1) in names
    for key in e2e.INT8_CONFIGS:
        assert (e2e.CONFIGS[key][0].format(alpha=0.3) + " (int8 drafter)", 1) in names
        assert ((e2e.CONFIGS[key][0].format(alpha=0.3) + " (int8 drafter)", 2) in names) == (
            key != "drafter")
    assert 0 < result["costs"]["int8"]["c"] and 0 < result["costs"]["c"]
    for r in result["rows"]:
        assert r.tokens == 3 * 12, r.name  # EOS stops no one: identical amounts of work
        assert r.wall_s > 0


def test_greedy_outputs_agree_and_calls_are_counted(result):
    # tiny fp32 models: lossless greedy decoding equals the verifier alone, ours and HF's
    assert set(e2e.greedy_agreement(result).values()) == {"3/3"}
    rows = {(r.name, r.batch): r for r in result["rows"]}
    assert rows["hf:verifier greedy", 1].verifier_calls == 36  # one call per token
    assert rows["ours:verifier", 1].tokens_per_verifier_call == 1.0
    assert rows["ours:spec greedy", 1].tokens_per_verifier_call > 1.0
    # HF drafts gamma = 3 tokens per call at most: at most 4 tokens per verifier call
    assert 1.0 < rows["hf:assisted greedy", 1].tokens_per_verifier_call <= 4.0


def test_summary_ratios(result):
    summary = {(d["name"], d["batch"]): d for d in e2e.summarize(result)}
    rows = {(r.name, r.batch): r for r in result["rows"]}
    spec, base = rows["ours:spec greedy", 1], rows["ours:verifier", 1]
    d = summary["ours:spec greedy", 1]
    assert d["vs_ours_verifier"] == round(spec.tokens_per_s / base.tokens_per_s, 3)
    c = result["costs"]
    pred = e2e.predicted_speedup(spec.tokens_per_verifier_call, 3, c["c"], c["r"])
    assert d["predicted"] == round(pred, 3)
    assert d["efficiency"] == round(d["vs_ours_verifier"] / pred, 3)
    # token_v3 runs the bonus drafter step: its block costs one more c
    v3 = rows["ours:token_v3 a=0.3 greedy", 1]
    assert summary["ours:token_v3 a=0.3 greedy", 1]["predicted"] == round(
        e2e.predicted_speedup(v3.tokens_per_verifier_call, 3, c["c"], c["r"], bonus_step=True), 3)
    table = e2e.markdown(result)
    assert "| ours:spec greedy | 1 |" in table
    assert e2e.markdown(e2e.from_json(e2e.to_json(result))) == table  # saved runs re-render


def test_unknown_config_is_an_error():
    with pytest.raises(ValueError, match="unknown configs"):
        e2e.run(None, None, prompts=[torch.tensor([1])], configs=("beam",))


def test_cost_model():
    # one token per block of cost gamma c + r; the bonus drafter step adds c
    assert e2e.predicted_speedup(1.0, 4, 0.5, 1.0) == pytest.approx(1 / 3.0)
    assert e2e.predicted_speedup(5.0, 4, 0.25, 1.0) == pytest.approx(5 / 2.0)
    assert e2e.predicted_speedup(5.0, 4, 0.25, 1.0, bonus_step=True) == pytest.approx(5 / 2.25)
    assert e2e.iid_tokens_per_block(0.0, 5) == pytest.approx(1.0)
    assert e2e.iid_tokens_per_block(1.0, 5) == pytest.approx(6.0)
    assert e2e.iid_tokens_per_block(0.8, 5) == pytest.approx((1 - 0.8 ** 6) / 0.2)
