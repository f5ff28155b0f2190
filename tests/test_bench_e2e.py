"""The end-to-end benchmark (``speccascade bench``) on tiny models: every configuration runs,
decodes the same number of tokens, and the derived figures follow from the measured ones."""
from __future__ import annotations

import pytest
import torch

from speccascade_fast.bench import e2e

from .helpers import tiny_pair

#: the greedy ``spec`` row with blocks cut at draft confidence 0.5, at most 4 drafts
CUT = "ours:spec greedy, draft confidence 0.5, at most 4 drafts"


@pytest.fixture(scope="module")
def result():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    q, p = tiny_pair()
    prompts = [torch.tensor([3, 5, 7, 9]), torch.tensor([1, 2]), torch.tensor([10, 20, 30])]
    try:
        yield e2e.run(q, p, prompts=prompts, max_new_tokens=12, batch=2, gamma=3,
                      int8_drafter=True, rounds=2, hf_defaults=True, draft_confidence=0.5,
                      dc_gamma=4, progress=lambda s: None)
    finally:
        torch.set_num_threads(old)


def test_every_configuration_decodes_the_same_work(result):
    names = {(r.name, r.batch) for r in result["rows"]}
    for name in ("ours:verifier", "ours:spec greedy", "ours:token_v3 a=0.3 T=1"):
        assert (name, 1) in names and (name, 2) in names
    for name in ("hf:verifier greedy", "hf:assisted greedy", "hf:assisted T=1", "ours:drafter",
                 "hf:assisted greedy (HF defaults)", "hf:assisted T=1 (HF defaults)"):
        assert (name, 1) in names
    for key in ("spec-greedy-dc", "spec-t1-dc", "token_v3-t1-dc"):  # gamma 4, not 3
        name = e2e.CONFIGS[key][0].format(alpha=0.3, dc=0.5) + ", at most 4 drafts"
        assert (name, 1) in names and (name, 2) in names
    assert result["settings"]["dc_gamma"] == 4
    for key in e2e.INT8_CONFIGS:
        assert (e2e.CONFIGS[key][0].format(alpha=0.3) + " (int8 drafter)", 1) in names
        assert ((e2e.CONFIGS[key][0].format(alpha=0.3) + " (int8 drafter)", 2) in names) == (
            key != "drafter")
    for name in ("hf:assisted greedy", "hf:assisted T=1"):  # HF with the same int8 assistant
        assert (name + e2e.INT8_SUFFIX, 1) in names
    assert 0 < result["costs"]["int8"]["c"] and 0 < result["costs"]["c"]
    for r in result["rows"]:
        # EOS stops no one: identical amounts of work, in each of the 2 rounds
        assert r.tokens == 2 * 3 * 12, r.name
        assert r.wall_s > 0 and len(r.extra["round_tokens_per_s"]) == 2
        assert not r.extra.get("rounds_differ"), r.name  # same inputs, same seeds, same tokens


def test_greedy_outputs_agree_and_calls_are_counted(result):
    # tiny fp32 models: lossless greedy decoding equals the verifier alone, ours and HF's
    assert set(e2e.greedy_agreement(result).values()) == {"3/3"}
    rows = {(r.name, r.batch): r for r in result["rows"]}
    assert rows["hf:verifier greedy", 1].verifier_calls == 72  # one call per token, 2 rounds
    assert rows["ours:verifier", 1].tokens_per_verifier_call == 1.0
    assert rows["ours:spec greedy", 1].tokens_per_verifier_call > 1.0
    # HF drafts gamma = 3 tokens per call at most: at most 4 tokens per verifier call
    assert 1.0 < rows["hf:assisted greedy", 1].tokens_per_verifier_call <= 4.0
    # what HF resolved: our settings, or its own defaults (up to 20 drafts, cut-off 0.4)
    assert rows["hf:assisted greedy", 1].extra["hf_settings"]["num_assistant_tokens"] == 3
    defaults = rows["hf:assisted greedy (HF defaults)", 1].extra["hf_settings"]
    assert defaults["num_assistant_tokens"] == 20
    assert defaults["assistant_confidence_threshold"] == pytest.approx(0.4)
    # the draft-confidence rows cut blocks short of gamma = 3 (their tokens: the greedy ones)
    cut = rows[CUT, 1]
    assert cut.extra["draft_confidence"] == 0.5
    assert cut.acceptance_rate > rows["ours:spec greedy", 1].acceptance_rate


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
    # the decoding alone: both runs' wall times less their prompts' prefill (both > 0), against
    # the cost model with the step costs timed while decoding (every decoding call counted)
    assert 0 < spec.extra["prefill_s"] < spec.wall_s and 0 < base.extra["prefill_s"] < base.wall_s
    (nq, sq), (nb, sb) = spec.extra["decode_calls"].values()
    (n1, s1), = base.extra["decode_calls"].values()
    assert (nb, n1) == (spec.verifier_calls, base.verifier_calls) == (spec.verifier_calls, 72)
    assert nq == 3 * nb  # gamma drafter steps per block (spec runs no bonus step)
    assert 0 < sq + sb < spec.extra["model_s"] and 0 < s1 < base.extra["model_s"]
    assert d["c_loop"] == round((sq / nq) / (s1 / n1), 3)
    assert d["r_loop"] == round((sb / nb) / (s1 / n1), 3)
    pred_loop = e2e.predicted_speedup(spec.tokens_per_verifier_call, 3, (sq / nq) / (s1 / n1),
                                      (sb / nb) / (s1 / n1))
    assert d["predicted_loop"] == round(pred_loop, 3)
    decode = (spec.tokens / (spec.wall_s - spec.extra["prefill_s"])) / (
        base.tokens / (base.wall_s - base.extra["prefill_s"]))
    assert d["decode_efficiency"] == round(decode / pred_loop, 3)
    assert "c_loop" not in summary["ours:spec greedy", 2]  # batch 1 only
    # on the CPU every row (ours and HF's) reports the time outside the models' forward calls
    for name, r in rows.items():
        assert 0 < r.extra["model_s"] < r.wall_s, name
        assert summary[name]["non_model_share"] == round(1 - r.extra["model_s"] / r.wall_s, 3)
    # token_v3 runs the bonus drafter step in the blocks that accept every draft: its blocks
    # cost the measured drafter calls (gamma + the bonus steps) c + r
    v3, v3d = rows["ours:token_v3 a=0.3 greedy", 1], summary["ours:token_v3 a=0.3 greedy", 1]
    steps = v3.extra["drafter_calls"] / v3.verifier_calls
    assert 3 < steps < 4 and v3d["drafter_steps_per_block"] == round(steps, 3)
    assert v3.extra["decode_calls"]["drafter"][0] == v3.extra["drafter_calls"]
    assert v3d["predicted"] == round(
        e2e.predicted_speedup(v3.tokens_per_verifier_call, steps, c["c"], c["r"]), 3)
    assert "drafter_steps_per_block" not in d  # spec: gamma per block, no bonus step
    # per-round ratios: the range holds the total's ratio
    lo, hi = d["vs_ours_verifier_range"]
    assert lo <= d["vs_ours_verifier"] <= hi
    speeds = [a / b for a, b in zip(spec.extra["round_tokens_per_s"],
                                    base.extra["round_tokens_per_s"])]
    assert [lo, hi] == [round(min(speeds), 3), round(max(speeds), 3)]
    # the int8 rows are compared with HF assisted generation given the same int8 assistant
    q8 = summary["ours:spec greedy" + e2e.INT8_SUFFIX, 1]
    assert q8["vs_hf_assisted"] == round(
        rows["ours:spec greedy" + e2e.INT8_SUFFIX, 1].tokens_per_s
        / rows["hf:assisted greedy" + e2e.INT8_SUFFIX, 1].tokens_per_s, 3)
    # blocks cut by draft_confidence: no prediction from the timed-apart costs (they assume
    # gamma drafts and a gamma + 1 call); the in-loop one from the measured steps per block
    cut, dc = rows[CUT, 1], summary[CUT, 1]
    (nq, sq), (nb, sb) = cut.extra["decode_calls"].values()
    assert nb == cut.verifier_calls and nb < nq < 4 * nb
    assert "predicted" not in dc and "efficiency" not in dc
    assert dc["drafter_steps_per_block"] == round(nq / nb, 3)
    assert dc["predicted_loop"] == round(e2e.predicted_speedup(
        cut.tokens_per_verifier_call, nq / nb, (sq / nq) / (s1 / n1), (sb / nb) / (s1 / n1)), 3)
    # every speculative row against HF assisted generation with HF's defaults, same sampling
    assert d["vs_hf_defaults"] == round(
        spec.tokens_per_s / rows["hf:assisted greedy (HF defaults)", 1].tokens_per_s, 3)
    assert summary["ours:spec T=1", 1]["vs_hf_defaults"] == round(
        rows["ours:spec T=1", 1].tokens_per_s
        / rows["hf:assisted T=1 (HF defaults)", 1].tokens_per_s, 3)
    table = e2e.markdown(result)
    assert "| ours:spec greedy | 1 |" in table and "2 rounds, interleaved" in table
    assert "vs_hf_defaults (range)" in table and "drafter_steps_per_block" in table
    assert e2e.markdown(e2e.from_json(e2e.to_json(result))) == table  # saved runs re-render


def test_unknown_config_is_an_error():
    with pytest.raises(ValueError, match="unknown configs"):
        e2e.run(None, None, prompts=[torch.tensor([1])], configs=("beam",))
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        e2e.run(None, None, prompts=[torch.tensor([1])], rounds=0)
    with pytest.raises(ValueError, match="draft_confidence"):
        e2e.run(None, None, prompts=[torch.tensor([1])], draft_confidence=1.0)


def test_rounds_alternate_their_order(monkeypatch):
    order = []

    def fake(name, *args, **kwargs):
        order.append(name)
        row = e2e.Row(name, 1, 4, 0.5, 1)
        row.extra["outputs"] = [[1, 2, 3, 4]]
        return row

    monkeypatch.setattr(e2e, "run_ours", fake)
    monkeypatch.setattr(e2e, "run_hf", fake)
    monkeypatch.setattr(e2e, "step_costs", lambda *a, **k: dict(
        t_q_s=1.0, t_p_s=2.0, t_p_block_s=2.0, c=0.5, r=1.0))
    result = e2e.run(None, None, prompts=[torch.tensor([1])], configs=("spec-greedy",),
                     batch=1, rounds=3, progress=lambda s: None)
    one = ["ours:verifier", "ours:spec greedy", "hf:verifier greedy", "hf:assisted greedy",
           "hf:assisted T=1"]
    assert order == one + one[::-1] + one
    assert [r.name for r in result["rows"]] == one  # one row per configuration, totals
    assert all(r.tokens == 12 and r.wall_s == 1.5 for r in result["rows"])


def test_cost_model():
    # one token per block of cost gamma c + r; the bonus drafter step adds c
    assert e2e.predicted_speedup(1.0, 4, 0.5, 1.0) == pytest.approx(1 / 3.0)
    assert e2e.predicted_speedup(5.0, 4, 0.25, 1.0) == pytest.approx(5 / 2.0)
    assert e2e.predicted_speedup(5.0, 4, 0.25, 1.0, bonus_step=True) == pytest.approx(5 / 2.25)
    assert e2e.iid_tokens_per_block(0.0, 5) == pytest.approx(1.0)
    assert e2e.iid_tokens_per_block(1.0, 5) == pytest.approx(6.0)
    assert e2e.iid_tokens_per_block(0.8, 5) == pytest.approx((1 - 0.8 ** 6) / 0.2)


def test_hf_gets_its_own_draft_length(monkeypatch):
    seen = {}

    def fake(name, *args, **kwargs):
        seen[name] = kwargs.get("gamma")
        row = e2e.Row(name, 1, 4, 0.5, 1)
        row.extra["outputs"] = [[1, 2, 3, 4]]
        return row

    monkeypatch.setattr(e2e, "run_ours", lambda name, *a, **k: fake(name, gamma=k.get("gamma")))
    monkeypatch.setattr(e2e, "run_hf", fake)
    monkeypatch.setattr(e2e, "step_costs", lambda *a, **k: dict(
        t_q_s=1.0, t_p_s=2.0, t_p_block_s=2.0, c=0.5, r=1.0))
    result = e2e.run(None, None, prompts=[torch.tensor([1])], configs=("spec-greedy",),
                     batch=1, gamma=3, hf_gamma=5, progress=lambda s: None)
    assert seen["ours:spec greedy"] == 3
    assert seen["hf:assisted greedy"] == 5 and seen["hf:assisted T=1"] == 5
    assert result["settings"]["hf_gamma"] == 5
    # the *-dc configurations take dc_gamma (default: gamma)
    seen.clear()
    result = e2e.run(None, None, prompts=[torch.tensor([1])], configs=("spec-greedy-dc",),
                     batch=1, gamma=3, dc_gamma=8, with_hf=False, progress=lambda s: None)
    assert seen == {"ours:verifier": None, "ours:spec greedy, draft confidence 0.6, at most 8 "
                    "drafts": 8}
    seen.clear()
    e2e.run(None, None, prompts=[torch.tensor([1])], configs=("spec-greedy-dc",), batch=1,
            gamma=3, with_hf=False, progress=lambda s: None)
    assert seen == {"ours:verifier": None, "ours:spec greedy, draft confidence 0.6": 3}
    with pytest.raises(ValueError, match="dc_gamma must be >= 1"):
        e2e.run(None, None, prompts=[torch.tensor([1])], dc_gamma=0)


def test_model_clock():
    """Calls and seconds per model; no models (the compiled rows) or a model off the CPU: no
    model time (on CUDA a call's host time is not the model's)."""
    lin = torch.nn.Linear(2, 2)
    with e2e._ModelClock(lin) as clock:
        lin(torch.ones(2))
        lin(torch.ones(2))
    assert clock.calls == [2] and len(clock.times[0]) == 2 and clock.model_s > 0
    lin(torch.ones(2))  # the hooks are gone
    assert clock.calls == [2]
    with e2e._ModelClock() as clock:
        pass
    assert clock.model_s is None
    meta = torch.nn.Linear(2, 2, device="meta")
    with e2e._ModelClock(meta) as clock:
        meta(torch.ones(2, device="meta"))
    assert clock.calls == [1] and clock.model_s is None


def test_in_loop_prediction_uses_unrounded_costs():
    """The in-loop prediction is computed from the step costs themselves, not from their
    three-decimal display: here c = 0.3635 would display as 0.364 (or 0.363), which moves the
    prediction in its third decimal."""
    base = e2e.Row("ours:verifier", 1, tokens=100, wall_s=11.0, verifier_calls=100,
                   extra={"prefill_s": 1.0, "decode_calls": {"verifier": [100, 10.0]}})
    spec = e2e.Row("ours:spec greedy", 1, tokens=100, wall_s=6.0, verifier_calls=20,
                   acceptance_rate=0.8,
                   extra={"prefill_s": 1.0,
                          "decode_calls": {"drafter": [60, 60 * 0.03635],
                                           "verifier": [20, 20 * 0.0979]}})
    result = {"rows": [base, spec], "costs": {"c": 0.36, "r": 0.98},
              "settings": {"gamma": 3}}
    d = next(x for x in e2e.summarize(result) if x["name"] == "ours:spec greedy")
    pred = e2e.predicted_speedup(5.0, 3, 0.3635, 0.979)
    assert d["predicted_loop"] == round(pred, 3) == 2.416  # (2.414 or 2.418 from 0.364 or 0.363)
    assert d["decode_efficiency"] == round((100 / 5.0) / (100 / 10.0) / pred, 3)
    assert d["c_loop"] in (0.363, 0.364) and d["r_loop"] == 0.979


def test_random_weights_command(tmp_path, capsys):
    """``speccascade bench --random-weights``: models of the pair's shapes (here shrunk by
    ``--overrides``) with random weights and random prompts, ours against HF in one run; the
    table says acceptance is not meaningful; bad arguments are clear errors."""
    from speccascade_fast import cli

    tiny = ('{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, '
            '"num_attention_heads": 4, "vocab_size": 64}')
    out = tmp_path / "o"
    argv = ["bench", "--random-weights", "--overrides", tiny, "--dtype", "float32",
            "--prompts", "2", "--prompt-len", "5", "--max-new-tokens", "6", "--batch", "2",
            "--configs", "verifier,spec-greedy", "--threads", "1"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    saved = e2e.from_json((out / "e2e.json").read_text())
    assert saved["settings"]["weights"] == "random" and "gpu" not in saved["machine"]
    rows = {(r.name, r.batch): r for r in saved["rows"]}
    assert {("ours:spec greedy", 2), ("hf:assisted greedy", 1)} <= set(rows)
    assert all(r.tokens == 2 * 6 for r in saved["rows"])
    # lossless greedy decoding of the same random verifier: the same tokens, ours and HF's
    assert set(e2e.greedy_agreement(saved).values()) == {"2/2"}
    assert "Random weights of the pair's shapes" in (out / "e2e.md").read_text()
    for bad, msg in ((["--overrides", "[1]"], "--overrides must be a JSON object"),
                     (["--prompt-len", "0"], "--prompt-len must be >= 1"),
                     (["--device", "nope"], "--device")):
        with pytest.raises(SystemExit, match=msg):
            cli.main([*argv, *bad])
    with pytest.raises(ValueError, match="weights must be"):
        e2e.run(None, None, prompts=[torch.tensor([1])], weights="fake")
