"""The end-to-end benchmark (``speccascade bench``) on tiny models: every configuration runs,
decodes the same number of tokens, and the derived figures follow from the measured ones."""
from __future__ import annotations

import mmap

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
                      dc_gamma=4, per_config_rss=True, progress=lambda s: None)
    finally:
        torch.set_num_threads(old)


def test_every_configuration_decodes_the_same_work(result):
    names = {(r.name, r.batch) for r in result["rows"]}
    for name in ("ours:verifier", "ours:spec greedy", "ours:token_v3 a=0.3 T=1"):
        assert (name, 1) in names and (name, 2) in names
    for name in ("hf:verifier greedy", "hf:assisted greedy", "hf:assisted T=1", "ours:drafter",
                 "hf:assisted greedy (HF defaults)", "hf:assisted T=1 (HF defaults)"):
        assert (name, 1) in names
    assert ("hf:verifier greedy", 2) in names  # HF's own batching, left-padded
    for key in ("spec-greedy-dc", "spec-t1-dc", "token_v3-t1-dc"):  # gamma 4, not 3
        name = e2e.CONFIGS[key][0].format(alpha=0.3, dc=0.5) + ", at most 4 drafts"
        assert (name, 1) in names and (name, 2) in names
    assert result["settings"]["dc_gamma"] == 4
    for key in ("spec-greedy-goodput", "spec-t1-goodput", "token_v3-t1-goodput",
                "spec-greedy-goodput-conf", "spec-t1-goodput-conf", "token_v3-t1-goodput-conf"):
        name = e2e.CONFIGS[key][0].format(alpha=0.3)
        rows = [r for r in result["rows"] if r.name == name]
        assert {r.batch for r in rows} == {1, 2}
        # blocks per chosen gamma, each gamma in [0, 3] (0 only where the rule allows it)
        assert all(set(r.extra["gammas"]) <= {0, 1, 2, 3} and r.extra["gammas"] for r in rows)
        # each predictor's mean log-loss per verified position (confidence: both are scored)
        want = {"counts", "positions"} | ({"confidence"} if key.endswith("-conf") else set())
        assert all(set(r.extra["acceptance_log_loss"]) == want for r in rows)
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
        # same inputs, same seeds, same tokens; but where each block's gamma follows measured
        # times (goodput), sampled tokens depend on where the blocks ended
        if not ("goodput" in r.name and "T=1" in r.name):
            assert not r.extra.get("rounds_differ"), r.name


def test_greedy_outputs_agree_and_calls_are_counted(result):
    # tiny fp32 models: lossless greedy decoding equals the verifier alone, ours and HF's
    assert set(e2e.greedy_agreement(result).values()) == {"3/3"}
    rows = {(r.name, r.batch): r for r in result["rows"]}
    assert rows["hf:verifier greedy", 1].verifier_calls == 72  # one call per token, 2 rounds
    assert rows["ours:verifier", 1].tokens_per_verifier_call == 1.0
    # batched HF: each row of a chunk counts the chunk's calls (the chunk of 1 too)
    assert rows["hf:verifier greedy", 2].tokens_per_verifier_call == 1.0
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


def test_summary_of_a_real_run(result):
    """What the timed run must provide for the summary (its figures are checked on fixed rows
    in test_summary_figures_by_hand): decoding calls and prefill timed, the summary's fields
    present where they apply and plausible."""
    summary = {(d["name"], d["batch"]): d for d in e2e.summarize(result)}
    rows = {(r.name, r.batch): r for r in result["rows"]}
    spec, base = rows["ours:spec greedy", 1], rows["ours:verifier", 1]
    d = summary["ours:spec greedy", 1]
    for key in ("vs_ours_verifier", "predicted", "efficiency", "iid_tokens_per_block", "c_loop",
                "r_loop", "predicted_loop", "decode_efficiency", "vs_hf_defaults"):
        assert d[key] > 0, key
    # the decoding alone: both runs' wall times less their prompts' prefill (both > 0), against
    # the cost model with the step costs timed while decoding (every decoding call counted)
    assert 0 < spec.extra["prefill_s"] < spec.wall_s and 0 < base.extra["prefill_s"] < base.wall_s
    (nq, sq), (nb, sb) = spec.extra["decode_calls"].values()
    (n1, s1), = base.extra["decode_calls"].values()
    assert (nb, n1) == (spec.verifier_calls, base.verifier_calls) == (spec.verifier_calls, 72)
    assert nq == 3 * nb  # gamma drafter steps per block (spec runs no bonus step)
    assert nq == spec.extra["drafter_calls"]  # the engine's count is the hooks' count
    assert 0 < sq + sb < spec.extra["model_s"] and 0 < s1 < base.extra["model_s"]
    assert "c_loop" not in summary["ours:spec greedy", 2]  # batch 1 only
    # on the CPU every row (ours and HF's) reports the time outside the models' forward calls
    for name, r in rows.items():
        assert 0 < r.extra["model_s"] < r.wall_s, name
        assert 0 < summary[name]["non_model_share"] < 1, name
    # token_v3 runs the bonus drafter step in the blocks that accept every draft: between
    # gamma = 3 and gamma + 1 drafter calls per block, all of them timed
    v3, v3d = rows["ours:token_v3 a=0.3 greedy", 1], summary["ours:token_v3 a=0.3 greedy", 1]
    assert 3 < v3d["drafter_steps_per_block"] < 4
    assert v3.extra["decode_calls"]["drafter"][0] == v3.extra["drafter_calls"]
    assert "drafter_steps_per_block" not in d  # spec: gamma per block, no bonus step
    # per-round ratios: the range holds the total's ratio
    lo, hi = d["vs_ours_verifier_range"]
    assert lo <= d["vs_ours_verifier"] <= hi
    assert len(spec.extra["round_tokens_per_s"]) == len(base.extra["round_tokens_per_s"]) == 2
    # the int8 rows are compared with HF assisted generation given the same int8 assistant
    assert summary["ours:spec greedy" + e2e.INT8_SUFFIX, 1]["vs_hf_assisted"] > 0
    # blocks cut by draft_confidence: no prediction from the timed-apart costs (they assume
    # gamma drafts and a gamma + 1 call); the in-loop one from the measured steps per block
    cut, dc = rows[CUT, 1], summary[CUT, 1]
    (nq, sq), (nb, sb) = cut.extra["decode_calls"].values()
    assert nb == cut.verifier_calls and nb < nq < 4 * nb and nq == cut.extra["drafter_calls"]
    assert "predicted" not in dc and "efficiency" not in dc
    assert 1 < dc["drafter_steps_per_block"] < 4 and dc["predicted_loop"] > 0
    assert summary["ours:spec T=1", 1]["vs_hf_defaults"] > 0
    table = e2e.markdown(result)
    assert "| ours:spec greedy | 1 |" in table and "2 rounds, interleaved" in table
    assert "vs_hf_defaults (range)" in table and "drafter_steps_per_block" in table
    assert e2e.markdown(e2e.from_json(e2e.to_json(result))) == table  # saved runs re-render


def _row(name, batch, tokens, wall_s, calls=None, acceptance=None, **extra):
    return e2e.Row(name, batch, tokens, wall_s, calls, acceptance,
                   extra={"outputs": [[1, 2]], **extra})


def test_summary_figures_by_hand():
    """summarize() on fixed rows (gamma = 3), every figure worked out by hand. Timed-apart step
    costs c = 0.2, r = 1.4 (int8 drafter: c = 0.1): a block of 3 drafter steps and one verifier
    call costs 3 x 0.2 + 1.4 = 2.0 verifier steps (int8: 0.3 + 1.4 = 1.7)."""
    rows = [
        # 60 tokens / 12 s = 5 tok/s, 5 tok/s in both rounds; decoding calls: 5.8 s / 58 = 0.1 s
        _row("ours:verifier", 1, 60, 12.0, 60, prefill_s=2.0, model_s=9.0,
             decode_calls={"verifier": [58, 5.8]}, round_tokens_per_s=[5.0, 5.0]),
        # 60 / 10 s = 6 tok/s (rounds: 7.5 and 5 tok/s), 60 tokens / 20 blocks = 3 per block,
        # 60 drafter calls / 20 blocks = 3 = gamma; drafter 1.2 s / 60 = 0.02 s a step,
        # verifier 2.8 s / 20 = 0.14 s a block call
        _row("ours:spec greedy", 1, 60, 10.0, 20, 0.5, prefill_s=2.0, model_s=8.5,
             drafter_calls=60, decode_calls={"drafter": [60, 1.2], "verifier": [20, 2.8]},
             round_tokens_per_s=[7.5, 5.0]),
        # 60 / 12 s = 5 tok/s, 60 / 15 = 4 tokens per block, 54 / 15 = 3.6 drafter steps per
        # block (the bonus step in 9 of the 15 blocks)
        _row("ours:token_v3 a=0.3 greedy", 1, 60, 12.0, 15, 0.75, drafter_calls=54),
        # a row saved before drafter_calls were recorded: gamma steps plus the bonus step
        _row("ours:token_v3 a=0.3 T=1", 1, 60, 10.0, 20, 0.5),
        # cut blocks: 60 / 8 s = 7.5 tok/s, 60 / 24 = 2.5 tokens and 48 / 24 = 2 drafter steps
        # per block; drafter 0.96 s / 48 = 0.02 s, verifier 2.4 s / 24 = 0.1 s a block call
        _row("ours:spec greedy, draft confidence 0.6", 1, 60, 8.0, 24, 0.6, prefill_s=2.0,
             drafter_calls=48, draft_confidence=0.6,
             decode_calls={"drafter": [48, 0.96], "verifier": [24, 2.4]}),
        # 60 / 7.5 s = 8 tok/s, 3 tokens per block
        _row("ours:spec greedy" + e2e.INT8_SUFFIX, 1, 60, 7.5, 20, 0.5, drafter_calls=60),
        _row("hf:verifier greedy", 1, 60, 15.0, 60, model_s=12.0),  # 4 tok/s
        _row("hf:assisted greedy", 1, 60, 12.0, 20),  # 5 tok/s
        _row("hf:assisted T=1", 1, 60, 10.0, 24),  # 6 tok/s
        _row("hf:assisted greedy" + e2e.HF_DEFAULTS_SUFFIX, 1, 60, 20.0, 30),  # 3 tok/s
        _row("hf:assisted greedy" + e2e.INT8_SUFFIX, 1, 60, 15.0, 20),  # 4 tok/s
        _row("ours:verifier", 2, 120, 12.0, 60),  # 10 tok/s
        _row("ours:spec greedy", 2, 120, 8.0, 40, 0.5, drafter_calls=120),  # 15 tok/s
    ]
    costs = {"t_q_s": 0.002, "t_p_s": 0.01, "t_p_block_s": 0.014, "c": 0.2, "r": 1.4,
             "int8": {"t_q_s": 0.001, "t_p_s": 0.01, "t_p_block_s": 0.014, "c": 0.1, "r": 1.4}}
    result = {"rows": rows, "costs": costs, "settings": {"gamma": 3, "rounds": 2},
              "machine": {}}
    s = {(d["name"], d["batch"]): d for d in e2e.summarize(result)}

    base = s["ours:verifier", 1]
    assert base["tokens_per_s"] == 5.0 and base["tokens_per_verifier_call"] == 1.0
    assert base["non_model_share"] == 0.25  # 1 - 9 s / 12 s
    assert base["vs_ours_verifier"] == 1.0 and base["vs_ours_verifier_range"] == [1.0, 1.0]
    assert base["vs_hf_verifier"] == 1.25  # 5 / 4 tok/s
    assert base["vs_hf_assisted"] == 1.0  # 5 / 5 (greedy)
    assert base["vs_hf_defaults"] == 1.667  # 5 / 3
    assert "predicted" not in base and "c_loop" not in base  # not speculative

    assert s["ours:spec greedy", 1] == {
        "name": "ours:spec greedy", "batch": 1, "tokens": 60, "wall_s": 10.0,
        "tokens_per_s": 6.0, "tokens_per_verifier_call": 3.0, "acceptance_rate": 0.5,
        "non_model_share": 0.15,  # 1 - 8.5 s / 10 s
        "vs_ours_verifier": 1.2,  # 6 / 5 tok/s
        "vs_ours_verifier_range": [1.0, 1.5],  # rounds: 5 / 5 and 7.5 / 5
        "vs_hf_verifier": 1.5,  # 6 / 4
        "vs_hf_assisted": 1.2,  # 6 / 5
        "vs_hf_defaults": 2.0,  # 6 / 3
        "predicted": 1.5,  # 3 tokens / (3 x 0.2 + 1.4) = 3 / 2
        "iid_tokens_per_block": 1.875,  # 1 + 0.5 + 0.25 + 0.125
        "efficiency": 0.8,  # 1.2 / 1.5
        # in-loop: drafter 0.02 s, verifier block call 0.14 s, verifier step 0.1 s
        "t_q_loop_ms": 20.0, "t_p_loop_ms": 100.0, "t_p_block_loop_ms": 140.0,
        "c_loop": 0.2, "r_loop": 1.4,  # 0.02 / 0.1, 0.14 / 0.1
        "predicted_loop": 1.5,  # 3 / (3 x 0.2 + 1.4)
        # decoding alone: 60 / (10 - 2 s) = 7.5 tok/s against 60 / (12 - 2 s) = 6 tok/s:
        # 1.25, over the prediction 1.5: 0.8333
        "decode_efficiency": 0.833,
    }

    v3 = s["ours:token_v3 a=0.3 greedy", 1]
    assert v3["drafter_steps_per_block"] == 3.6
    assert v3["predicted"] == 1.887  # 4 / (3.6 x 0.2 + 1.4) = 4 / 2.12 = 1.88679
    assert v3["efficiency"] == 0.53  # (5 / 5 tok/s) / 1.88679 = 2.12 / 4
    assert v3["iid_tokens_per_block"] == 2.734  # 1 + 0.75 + 0.5625 + 0.421875 = 2.734375
    assert "c_loop" not in v3  # no timed decoding calls

    old = s["ours:token_v3 a=0.3 T=1", 1]
    assert "drafter_steps_per_block" not in old  # gamma steps (+ the bonus step, not shown)
    assert old["predicted"] == 1.364  # 3 / (3 x 0.2 + 1.4 + 0.2) = 3 / 2.2 = 1.36364
    assert old["efficiency"] == 0.88  # (6 / 5 tok/s) / 1.36364 = 1.2 x 2.2 / 3
    assert old["vs_hf_assisted"] == 1.0  # against hf:assisted T=1: 6 / 6 tok/s
    assert "vs_hf_defaults" not in old  # no HF-defaults row at T = 1

    cut = s["ours:spec greedy, draft confidence 0.6", 1]
    assert cut["vs_ours_verifier"] == 1.5 and cut["vs_hf_defaults"] == 2.5  # 7.5 / 5, 7.5 / 3
    assert cut["drafter_steps_per_block"] == 2.0
    assert "predicted" not in cut and "efficiency" not in cut and "iid_tokens_per_block" not in cut
    assert (cut["c_loop"], cut["r_loop"]) == (0.2, 1.0)  # 0.02 / 0.1, 0.1 / 0.1
    assert cut["predicted_loop"] == 1.786  # 2.5 tokens / (2 x 0.2 + 1.0) = 2.5 / 1.4 = 1.78571
    # decoding alone: 60 / (8 - 2 s) = 10 tok/s against 6 tok/s: 1.66667; / 1.78571 = 0.93333
    assert cut["decode_efficiency"] == 0.933

    q8 = s["ours:spec greedy" + e2e.INT8_SUFFIX, 1]
    assert q8["vs_ours_verifier"] == 1.6  # 8 / 5 tok/s
    assert q8["vs_hf_assisted"] == 2.0  # against HF with the same int8 assistant: 8 / 4
    assert q8["vs_hf_defaults"] == 2.667  # against HF's defaults (its own assistant): 8 / 3
    assert q8["predicted"] == 1.765  # the int8 costs: 3 / (3 x 0.1 + 1.4) = 3 / 1.7 = 1.76471
    assert q8["efficiency"] == 0.907  # 1.6 / 1.76471 = 1.6 x 1.7 / 3 = 0.90667

    hf = s["hf:verifier greedy", 1]
    assert hf["vs_ours_verifier"] == 0.8 and hf["non_model_share"] == 0.2  # 4 / 5; 1 - 12 / 15

    # batch 2: against our verifier at batch 2 (15 / 10 tok/s, not 15 / 5 at batch 1); HF's
    # batch-2 throughput is its batch-1 run (15 / 4 tok/s); no prediction at batch 2
    b2 = s["ours:spec greedy", 2]
    assert (b2["vs_ours_verifier"], b2["vs_hf_verifier"]) == (1.5, 3.75)
    assert "predicted" not in b2 and "c_loop" not in b2 and "vs_ours_verifier_range" not in b2

    table = e2e.markdown(result)
    assert ("| ours:spec greedy | 1 | 6.0 | 3.0 | 0.5 | 1.2 (1.0–1.5) | 1.5 | 1.2 | 2.0 | 1.5 "
            "| 0.8 | 0.2 |  | 1.5 | 0.833 | 0.15 |") in table.splitlines()
    assert ("ours:spec greedy: drafter 20.0, verifier block call 140.0, verifier step 100.0 "
            "(c = 0.200, r = 1.400)") in table
    assert ("drafter step 2.0 ms, verifier step 10.0 ms, verifier call on gamma+1 tokens "
            "14.0 ms: c = 0.200, r = 1.400.") in table


def test_t1_rows_compare_with_the_verifier_at_t1_where_it_ran():
    rows = [_row("ours:verifier", 1, 60, 12.0, 60),  # 5 tok/s
            _row(e2e.VERIFIER_T1, 1, 60, 15.0, 60),  # 4 tok/s
            _row("ours:spec T=1", 1, 60, 10.0, 20, 0.5, drafter_calls=60),  # 6 tok/s
            _row("ours:spec greedy", 1, 60, 10.0, 20, 0.5, drafter_calls=60),
            _row("ours:verifier", 2, 120, 12.0, 60),  # 10 tok/s; no T = 1 verifier at batch 2
            _row("ours:spec T=1", 2, 120, 10.0, 40, 0.5, drafter_calls=120)]  # 12 tok/s
    costs = {"t_q_s": 0.002, "t_p_s": 0.01, "t_p_block_s": 0.014, "c": 0.2, "r": 1.4}
    result = {"rows": rows, "costs": costs, "settings": {"gamma": 3}, "machine": {}}
    s = {(d["name"], d["batch"]): d["vs_ours_verifier"] for d in e2e.summarize(result)}
    assert s["ours:spec T=1", 1] == 1.5  # 6 / 4 (T = 1), not 6 / 5 (greedy)
    assert s["ours:spec greedy", 1] == 1.2
    assert s[e2e.VERIFIER_T1, 1] == 0.8  # sampling against the greedy verifier: 4 / 5
    assert s["ours:spec T=1", 2] == 1.2  # no T = 1 verifier at batch 2: the greedy one
    assert "against ours:verifier T=1 (same batch) for the other T = 1 rows" in e2e.markdown(result)
    assert e2e.CONFIGS["verifier-t1"][1] == dict(method="autoregressive", temperature=1.0)


def test_unknown_config_is_an_error():
    with pytest.raises(ValueError, match="unknown config"):
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

    # each round re-times the step costs; the result keeps their medians
    rounds_costs = iter([dict(t_q_s=1.0, t_p_s=2.0, t_p_block_s=2.0, c=0.5, r=1.0),
                         dict(t_q_s=3.0, t_p_s=4.0, t_p_block_s=8.0, c=0.75, r=2.0),
                         dict(t_q_s=2.0, t_p_s=5.0, t_p_block_s=4.0, c=0.4, r=0.8)])
    monkeypatch.setattr(e2e, "run_ours", fake)
    monkeypatch.setattr(e2e, "run_hf", fake)
    monkeypatch.setattr(e2e, "step_costs", lambda *a, **k: next(rounds_costs))
    result = e2e.run(None, None, prompts=[torch.tensor([1])], configs=("spec-greedy",),
                     batch=1, rounds=3, progress=lambda s: None)
    one = ["ours:verifier", "ours:spec greedy", "hf:verifier greedy", "hf:assisted greedy",
           "hf:assisted T=1"]
    assert order == one + one[::-1] + one
    assert [r.name for r in result["rows"]] == one  # one row per configuration, totals
    for r in result["rows"]:
        # 3 rounds of 4 tokens in 0.5 s, 1 verifier call: 12 tokens in 1.5 s, 3 calls; each
        # round at 4 / 0.5 = 8 tok/s
        assert (r.tokens, r.wall_s, r.verifier_calls) == (12, 1.5, 3)
        assert r.extra["round_tokens_per_s"] == [8.0, 8.0, 8.0]
    # medians of (1, 3, 2), (2, 4, 5), (2, 8, 4), (0.5, 0.75, 0.4), (1, 2, 0.8)
    assert result["costs"] == dict(t_q_s=2.0, t_p_s=4.0, t_p_block_s=4.0, c=0.5, r=1.0)


def test_cost_model():
    # a block costs gamma c + r verifier steps; the bonus drafter step adds c
    assert e2e.predicted_speedup(1.0, 4, 0.5, 1.0) == pytest.approx(0.33333333)  # 1 / (2 + 1)
    assert e2e.predicted_speedup(5.0, 4, 0.25, 1.0) == pytest.approx(2.5)  # 5 / (1 + 1)
    # 5 / (1 + 1 + 0.25) = 5 / 2.25
    assert e2e.predicted_speedup(5.0, 4, 0.25, 1.0, bonus_step=True) == pytest.approx(2.2222222)
    # mean drafter steps per block (blocks of varying length): 3.5 x 0.2 + 1.3 = 2.0
    assert e2e.predicted_speedup(3.0, 3.5, 0.2, 1.3) == pytest.approx(1.5)
    # i.i.d. acceptance a, gamma = 5: 1 + a + a^2 + ... + a^5 tokens per block
    assert e2e.iid_tokens_per_block(0.0, 5) == pytest.approx(1.0)
    assert e2e.iid_tokens_per_block(1.0, 5) == pytest.approx(6.0)
    # 1 + 0.8 + 0.64 + 0.512 + 0.4096 + 0.32768
    assert e2e.iid_tokens_per_block(0.8, 5) == pytest.approx(3.68928)
    assert e2e.iid_tokens_per_block(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25


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


def test_lenience_control_configurations_get_their_settings(monkeypatch):
    seen = {}

    def fake(name, *args, **kwargs):
        seen[name] = {k: kwargs.get(k) for k in ("exact_prefix", "divergence_budget", "rule")}
        row = e2e.Row(name, 1, 4, 0.5, 1)
        row.extra["outputs"] = [[1, 2, 3, 4]]
        return row

    monkeypatch.setattr(e2e, "run_ours", fake)
    monkeypatch.setattr(e2e, "step_costs", lambda *a, **k: dict(
        t_q_s=1.0, t_p_s=2.0, t_p_block_s=2.0, c=0.5, r=1.0))
    result = e2e.run(None, None, prompts=[torch.tensor([1])], batch=1, with_hf=False,
                     configs=("token_v3-t1", "token_v3-t1-window", "token_v3-t1-budget"),
                     exact_prefix=8, divergence_budget=0.25, progress=lambda s: None)
    assert seen["ours:token_v3 a=0.3 T=1, exact prefix 8"] == dict(
        exact_prefix=8, divergence_budget=None, rule="token_v3")
    assert seen["ours:token_v3 a=0.3 T=1, divergence budget 0.25"] == dict(
        exact_prefix=None, divergence_budget=0.25, rule="token_v3")
    assert seen["ours:token_v3 a=0.3 T=1"]["exact_prefix"] is None
    assert result["settings"]["exact_prefix"] == 8
    assert result["settings"]["divergence_budget"] == 0.25


def test_compiled_drafter_reruns_each_drafting_configuration(monkeypatch):
    seen = []

    def fake(name, q, verifier, prompts, *, batch, **kwargs):
        seen.append((name, batch, kwargs.get("compile_drafter", False), kwargs.get("gamma")))
        row = e2e.Row(name, batch, 4, 0.5, 1)
        row.extra["outputs"] = [[1, 2, 3, 4]]
        return row

    monkeypatch.setattr(e2e, "run_ours", fake)
    monkeypatch.setattr(e2e, "step_costs", lambda *a, **k: dict(
        t_q_s=1.0, t_p_s=2.0, t_p_block_s=2.0, c=0.5, r=1.0, compiled=k.get("compile_drafter")))
    result = e2e.run(None, None, prompts=[torch.tensor([1])], batch=[1, 4], with_hf=False,
                     configs=("spec-greedy", "spec-greedy@g2", "token_v3-t1-goodput"),
                     compile_drafter=True, progress=lambda s: None)
    compiled = [(n, b, g) for n, b, c, g in seen if c]
    assert compiled == [("ours:drafter (compiled drafter)", 1, None),
                        ("ours:spec greedy (compiled drafter)", 1, 5),
                        ("ours:spec greedy, gamma 2 (compiled drafter)", 1, 2),
                        ("ours:token_v3 a=0.3 T=1, goodput gamma (compiled drafter)", 1, 5)]
    assert result["costs"]["compiled"]["compiled"] is True  # its own step costs


def test_several_batch_sizes_run_every_configuration_at_each(monkeypatch):
    seen = []

    def fake(name, q, verifier, prompts, *, batch, **kwargs):
        seen.append((name, batch))
        row = e2e.Row(name, batch, 4, 0.5, 1)
        row.extra["outputs"] = [[1, 2, 3, 4]]
        return row

    monkeypatch.setattr(e2e, "run_ours", fake)
    monkeypatch.setattr(e2e, "step_costs", lambda *a, **k: dict(
        t_q_s=1.0, t_p_s=2.0, t_p_block_s=2.0, c=0.5, r=1.0))
    result = e2e.run(None, None, prompts=[torch.tensor([1])], batch=[4, 1, 8, 4],
                     with_hf=False, configs=("drafter", "spec-t1", "spec-t1-goodput"),
                     progress=lambda s: None)
    names = ["ours:verifier", "ours:spec T=1", "ours:spec T=1, goodput gamma"]
    want = [(n, 1) for n in [names[0], "ours:drafter", *names[1:]]]
    want += [(n, b) for b in (4, 8) for n in names]  # the drafter alone at batch 1 only
    assert seen == want
    assert {(r.name, r.batch) for r in result["rows"]} == set(want)
    # a fixed draft length per configuration: @gN
    seen.clear()
    e2e.run(None, None, prompts=[torch.tensor([1])], batch=1, with_hf=False,
            configs=("spec-t1@g2", "spec-t1", "spec-t1-goodput@g3"), progress=lambda s: None)
    assert [n for n, _ in seen] == ["ours:verifier", "ours:spec T=1", "ours:spec T=1, gamma 2",
                                    "ours:spec T=1, goodput gamma, at most 3 drafts"]
    for bad, msg in (("spec-t1@g0", "@gN"), ("spec-t1@gx", "@gN"), ("verifier@g2", "@gN"),
                     ("spec-t1-dc@g2", "@gN"), ("spec-t1@g02", "@gN"), ("spec-t1@g²", "@gN"),
                     ("nope@g2", "unknown config")):
        with pytest.raises(ValueError, match=msg):
            e2e.split_key(bad)
    for bad in ([], [0], [2, True], "4"):
        with pytest.raises(ValueError, match="batch must be"):
            e2e.run(None, None, prompts=[torch.tensor([1])], batch=bad, with_hf=False,
                    configs=("spec-t1",), progress=lambda s: None)


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
    # verifier step 10 s / 100 = 0.1 s: c = 0.03635 / 0.1 = 0.3635, r = 0.0979 / 0.1 = 0.979;
    # 100 tokens / 20 blocks = 5 per block: 5 / (3 x 0.3635 + 0.979) = 5 / 2.0695 = 2.41604
    # (from c = 0.364: 5 / 2.071 = 2.41429; from 0.363: 5 / 2.068 = 2.41779)
    assert d["predicted_loop"] == 2.416
    # decoding alone: 100 / (6 - 1 s) = 20 tok/s against 100 / (11 - 1 s) = 10 tok/s: 2.0;
    # 2.0 / 2.41604 = 0.82780
    assert d["decode_efficiency"] == 0.828
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
    capsys.readouterr()  # the good run's progress
    for bad, msg in ((["--overrides", "[1]"], "--overrides must be a JSON object"),
                     (["--prompt-len", "0"], "--prompt-len must be >= 1"),
                     (["--batch", "2", "0"], "--batch must be >= 1"),
                     (["--warmup-tokens", "-1"], "--warmup-tokens must be >= 0"),
                     (["--device", "nope"], "--device")):
        assert cli.main([*argv, *bad]) == 2  # one line on stderr, no traceback
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="weights must be"):
        e2e.run(None, None, prompts=[torch.tensor([1])], weights="fake")


def test_a_rows_own_gamma_enters_its_cost_model():
    costs = dict(t_q_s=1.0, t_p_s=2.0, t_p_block_s=2.0, c=0.5, r=1.0)
    rows = [e2e.Row("ours:verifier", 1, 10, 5.0, 10),
            e2e.Row("ours:spec T=1, gamma 2", 1, 10, 2.0, 4, 0.8, extra={"gamma": 2}),
            e2e.Row("ours:spec T=1", 1, 10, 2.0, 4, 0.8)]
    result = {"rows": rows, "costs": costs, "settings": {"gamma": 5}}
    got = {d["name"]: d for d in e2e.summarize(result)}
    assert got["ours:spec T=1, gamma 2"]["iid_tokens_per_block"] == pytest.approx(
        e2e.iid_tokens_per_block(0.8, 2), abs=1e-3)
    assert got["ours:spec T=1"]["iid_tokens_per_block"] == pytest.approx(
        e2e.iid_tokens_per_block(0.8, 5), abs=1e-3)


def test_rounds_merge_blocks_per_gamma_and_log_loss():
    """A configuration's rounds add up: tokens, blocks per chosen gamma, and each acceptance
    predictor's mean log-loss weighted by its rounds' verified positions."""
    def row(gammas, loss, n):
        r = e2e.Row("ours:spec T=1, goodput gamma", 1, 10, 2.0, 5, 0.8)
        r.extra.update(outputs=[[1]], gammas=gammas, prefill_s=0.5,
                       acceptance_log_loss={"counts": loss, "positions": n})
        return r
    merged = {}
    e2e._merge(merged, row({0: 2, 5: 1}, 0.4, 30))
    e2e._merge(merged, row({5: 3}, 0.2, 10))
    (total,) = merged.values()
    assert total.tokens == 20 and total.extra["gammas"] == {0: 2, 5: 4}
    assert total.extra["acceptance_log_loss"] == {"counts": pytest.approx(0.35), "positions": 40}
    assert total.extra["round_tokens_per_s"] == [5.0, 5.0]


def test_each_configuration_has_its_own_peak_memory(result):
    """Every row (ours and HF's) carries the peak resident memory of its own runs, which the
    table shows; the process's peak stays the largest of them all."""
    if not e2e.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    peaks = {(d["name"], d["batch"]): d.get("peak_rss_mib") for d in e2e.summarize(result)}
    assert all(v is not None and v > 0 for v in peaks.values()), peaks
    assert "peak_rss_mib" in e2e.markdown(result).splitlines()[0]
    # (the rows show whole MiB: compare with the process's peak rounded the same way)
    assert round(result["memory"]["peak_rss_mib"]) >= max(peaks.values())


def test_a_configurations_peak_forgets_what_an_earlier_one_allocated(monkeypatch):
    """The peak restarts before each run: a run after one that allocated and freed 96 MiB does
    not inherit that peak; the process's peak keeps it; without per_config_rss no row has one."""
    if not e2e.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")

    def fake(name, *args, **kwargs):
        if name == "ours:verifier":
            # fresh anonymous pages, touched, then unmapped: a malloc could be served from
            # memory earlier tests freed but the process still holds (no new resident pages)
            big = mmap.mmap(-1, 96 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for i in range(0, len(big), mmap.PAGESIZE):
                big[i] = 1
            big.close()
        row = e2e.Row(name, 1, 4, 0.5, 1)
        row.extra["outputs"] = [[1, 2, 3, 4]]
        return row

    monkeypatch.setattr(e2e, "run_ours", fake)
    monkeypatch.setattr(e2e, "step_costs", lambda *a, **k: dict(t_q_s=1.0, t_p_s=2.0,
                                                                  t_p_block_s=2.0, c=0.5, r=1.0))
    kw = dict(prompts=[torch.tensor([1])], configs=("spec-greedy",), batch=1, with_hf=False,
              progress=lambda s: None)
    result = e2e.run(None, None, per_config_rss=True, **kw)
    peak = {r.name: r.extra["peak_rss_mib"] for r in result["rows"]}
    assert peak["ours:verifier"] > peak["ours:spec greedy"] + 64
    assert result["memory"]["peak_rss_mib"] >= peak["ours:verifier"]
    assert all("peak_rss_mib" not in r.extra for r in e2e.run(None, None, **kw)["rows"])


def test_a_warm_up_call_runs_on_the_timed_engine_before_the_clock(monkeypatch):
    """``warmup_tokens``: one untimed call on the same Engine first, so a goodput controller
    starts the timed call from measured step times (no exploration blocks inside it)."""
    from speccascade_fast import engine as engine_module

    calls = []  # (engine, max_new_tokens, gammas) of every generate
    generate = engine_module.Engine.generate

    def spy(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        calls.append((self, kwargs["max_new_tokens"], out.stats.get("gammas")))
        return out

    monkeypatch.setattr(engine_module.Engine, "generate", spy)
    q, p = tiny_pair()
    prompts = [torch.tensor([3, 5, 7, 9]), torch.tensor([1, 2])]
    row = e2e.run_ours("x", q, p, prompts, batch=2, max_new_tokens=10, pad=0, warmup=6,
                       rule="spec", temperature=0.0, gamma=3, gamma_policy="goodput")
    (warm, n_warm, explored), (timed, n, gammas) = calls
    assert warm is timed and (n_warm, n) == (6, 10) and row.tokens == 20
    assert explored[:3] == [3, 1, 0]  # the controller's exploration, in the untimed call
    # so the timed call found gamma 3, 1 and 0 measured: it had nothing left to explore
    assert {(2, 3), (2, 1), (2, 0)} <= set(timed._goodput.times)
    assert sum(row.extra["gammas"].values()) == len(gammas)  # only the timed call is counted
    calls.clear()
    e2e.run_ours("x", q, p, prompts, batch=2, max_new_tokens=10, pad=0, rule="spec",
                 temperature=0.0, gamma=3, gamma_policy="goodput")
    assert len(calls) == 1 and calls[0][2][:3] == [3, 1, 0]  # no warm-up: explored in the clock
    calls.clear()  # a warm-up longer than the run is cut to the run's length (the engine's size)
    e2e.run_ours("x", q, p, prompts, batch=2, max_new_tokens=4, pad=0, warmup=50, rule="spec",
                 temperature=0.0, gamma=3, gamma_policy="goodput")
    assert [n for _, n, _ in calls] == [4, 4]
    with pytest.raises(ValueError, match="warmup_tokens must be an int >= 0"):
        e2e.run(None, None, prompts=[torch.tensor([1])], warmup_tokens=-1)
