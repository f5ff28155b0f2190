"""The evaluation harness's run modes and statistics: batched quality rows equal to batch-1 rows
(tiny models, the real engine), the latency mode, pre-registered plans, the min-p baseline,
Holm's adjustment, the pooled verifier, bootstrap CIs of the Table-2 figures, and the plots'
fixed styles. CPU, seconds."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from speccascade_fast.eval import EvalConfig, load_rows, run_eval, summarize
from speccascade_fast.eval.grids import GRIDS, Grid, build_plan
from speccascade_fast.eval.harness import run_latency
from speccascade_fast.eval.plots import STYLES, style
from speccascade_fast.eval.summary import holm, to_markdown, wilson
from speccascade_fast.eval.tasks import Example

from .eval_helpers import ToyTask, byte_tokenizer, counting, tiny_llama


class FiveTask(ToyTask):
    """Five prompts of different lengths (batches with left padding)."""

    def examples(self, limit=None):
        qs = ["abc", "hello there", "a", "banana split", "xyz q"]
        return [Example(f"toy-{i}", {"q": q}) for i, q in enumerate(qs)][:limit]


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    V = len(tok)
    return tiny_llama(V, 1, seed=1), tiny_llama(V, 2, seed=2), tok


def batch_fake(drafter, verifier, input_ids, *, method="spec_cascade", rule=None, alpha=None,
               max_new_tokens=8, seed=0, attention_mask=None, **kw):
    """A generate stand-in for batches: each row's tokens depend only on its own seed; per-row
    statistics in ``stats["per_sequence"]``."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    new, per = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s + 7919 * len(method) + int(1000 * (alpha or 0)))
        new.append(torch.randint(0, 256, (max_new_tokens,), generator=g).tolist())
        n = max_new_tokens
        per.append({"tokens": n, "verifier_calls": n if method == "autoregressive" else 2,
                    "drafter_calls": 0, "drafted": n, "accepted": n - 1, "rejected": 1,
                    "deferred": 1})
    stats = {k: sum(p[k] for p in per) for k in per[0]}
    if len(seeds) > 1:
        stats["per_sequence"] = per
    seqs = torch.cat([input_ids.cpu(), torch.tensor(new)], 1)
    return argparse.Namespace(sequences=seqs, stats=stats, new_tokens=new)


# ---------------------------------------------------------------------------------------------
# quality mode: batched rows are the batch-1 rows

BATCH_CONFIGS = ["autoregressive", "spec_cascade:spec", "spec_cascade:token_v3:0.3",
                 "spec_cascade:token_v3:0.3:bonus=verifier",
                 "spec_cascade:ensemble:0.5:bonus=verifier", "autoregressive:min_p=0.7"]
SAME = ("seed", "output_sha", "new_tokens", "prompt_tokens", "output", "scoring")
SAME_STATS = ("tokens", "verifier_calls", "drafted", "accepted", "rejected", "deferred")


@pytest.mark.parametrize("T", [0.0, 1.0])
def test_batched_rows_equal_batch_1_rows(tiny, tmp_path, T):
    """``batch_size=2`` (one Engine per configuration, chunks of 2, 2 and 1 prompts of different
    lengths, left-padded): every row has the batch-1 row's seed, tokens and statistics."""
    drafter, verifier, tok = tiny
    common = dict(drafter=drafter, verifier=verifier, tokenizer=tok, limit=None, seed=5,
                  gamma=3, temperature=T, max_new_tokens=12, progress=False, chat=False,
                  plots=False)
    run_eval(FiveTask(), BATCH_CONFIGS, out_dir=tmp_path / "b1", **common)
    summary = run_eval(FiveTask(), BATCH_CONFIGS, out_dir=tmp_path / "b2", batch_size=2,
                       **common)
    one = {(r["config"], r["example_id"]): r for r in load_rows(tmp_path / "b1" / "rows.jsonl")}
    two = {(r["config"], r["example_id"]): r for r in load_rows(tmp_path / "b2" / "rows.jsonl")}
    assert one.keys() == two.keys() and len(one) == len(BATCH_CONFIGS) * 5
    for k, r in two.items():
        for f in SAME:
            assert r[f] == one[k][f], (k, f)
        for f in SAME_STATS:
            assert r["stats"][f] == one[k]["stats"][f], (k, f)
        assert r["wall_s"] is None and one[k]["wall_s"] > 0
        assert r["batch_size"] == 2 and r["batch_rows"] in (1, 2)
        assert r["engine"] == "static"  # the min-p baseline too
    # quality rows carry no latency: the batched summary has none
    assert all(p["relative_latency"] is None for p in summary["configs"])
    assert summary["latency"]["source"] is None


def test_batched_mode_with_a_custom_generate_and_resume(tmp_path):
    gen = counting(batch_fake)
    common = dict(drafter=object(), verifier=object(), tokenizer=byte_tokenizer(), limit=5,
                  seed=0, out_dir=tmp_path, gamma=2, max_new_tokens=4, progress=False,
                  chat=False, generate_fn=gen, plots=False, batch_size=2)
    run_eval(FiveTask(), ["autoregressive", "spec_cascade:token_v3:0.1"], **common)
    assert [len(c["seed"]) for c in gen.calls] == [2, 2, 1, 2, 2, 1]  # configurations outer
    assert gen.calls[0]["seed"] == [0, 1] and gen.calls[2]["seed"] == [4]  # the batch-1 seeds
    rows = load_rows(tmp_path / "rows.jsonl")
    assert [r["stats"]["verifier_calls"] for r in rows[:5]] == [4] * 5  # per row, not summed
    gen.calls.clear()
    run_eval(FiveTask(), ["autoregressive", "spec_cascade:token_v3:0.1"], **common)
    assert gen.calls == []
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(FiveTask(), ["autoregressive"], **{**common, "batch_size": 0})


# ---------------------------------------------------------------------------------------------
# several samples (seeds) per example


def test_samples_batched_equal_batch_1_and_extend_a_single_sample_run(tiny, tmp_path):
    """``samples=2``: sample 0 is the one-sample run's row (same seed, same tokens), sample 1 has
    its own seed, the same for every configuration; batched rows equal batch-1 rows."""
    drafter, verifier, tok = tiny
    cfgs = ["autoregressive", "spec_cascade:token_v3:0.3"]
    common = dict(drafter=drafter, verifier=verifier, tokenizer=tok, limit=None, seed=5,
                  gamma=3, temperature=1.0, max_new_tokens=10, progress=False, chat=False,
                  plots=False)
    run_eval(FiveTask(), cfgs, out_dir=tmp_path / "one", **common)
    s1 = run_eval(FiveTask(), cfgs, out_dir=tmp_path / "b1", samples=2, **common)
    s2 = run_eval(FiveTask(), cfgs, out_dir=tmp_path / "b2", samples=2, batch_size=3, **common)
    key = ("config", "example_id", "sample")
    one = {(r["config"], r["example_id"]): r for r in load_rows(tmp_path / "one" / "rows.jsonl")}
    b1 = {tuple(r[k] for k in key): r for r in load_rows(tmp_path / "b1" / "rows.jsonl")}
    b2 = {tuple(r[k] for k in key): r for r in load_rows(tmp_path / "b2" / "rows.jsonl")}
    assert b1.keys() == b2.keys() and len(b1) == 2 * 5 * 2
    for k, r in b2.items():
        for f in SAME:
            assert r[f] == b1[k][f], (k, f)
    for (c, e), r in one.items():
        assert b1[(c, e, 0)]["output_sha"] == r["output_sha"] and b1[(c, e, 0)]["seed"] == r["seed"]
    seeds = {(e, x): b1[(c, e, x)]["seed"] for c, e, x in b1}
    assert all(b1[("autoregressive", e, x)]["seed"] == b1[("spec_cascade/token_v3/alpha=0.3", e,
                                                           x)]["seed"] for _, e, x in b1)
    assert len(set(seeds.values())) == 10  # every (example, sample) its own seed
    assert any(b1[("autoregressive", e, 0)]["output_sha"] != b1[("autoregressive", e, 1)]
               ["output_sha"] for e in (f"toy-{i}" for i in range(5)))
    assert s1["samples"] == s2["samples"] == 2 and s1["n_examples"] == 5
    assert "2 samples (seeds) each" in (tmp_path / "b1" / "summary.md").read_text()


def test_samples_resume_per_sample_and_refuse_a_corpus_metric(tmp_path):
    gen = counting(batch_fake)
    common = dict(drafter=object(), verifier=object(), tokenizer=byte_tokenizer(), limit=3,
                  seed=0, gamma=2, max_new_tokens=4, progress=False, chat=False,
                  generate_fn=gen, plots=False, batch_size=2)
    run_eval(FiveTask(), ["autoregressive"], out_dir=tmp_path, samples=3, **common)
    assert [c["seed"][0] for c in gen.calls][:1] == [0]
    rows = load_rows(tmp_path / "rows.jsonl")
    assert [(r["example_id"], r["sample"]) for r in rows] == [
        (f"toy-{i}", x) for i in range(3) for x in range(3)]
    lines = (tmp_path / "rows.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "rows.jsonl").write_text("".join(lines[:7]))  # drop toy-2's samples 1 and 2
    gen.calls.clear()
    s = run_eval(FiveTask(), ["autoregressive"], out_dir=tmp_path, samples=3, **common)
    assert [len(c["seed"]) for c in gen.calls] == [2]
    rows = load_rows(tmp_path / "rows.jsonl")
    assert sorted((r["example_id"], r["sample"]) for r in rows) == [
        (f"toy-{i}", x) for i in range(3) for x in range(3)]
    assert s["n_examples"] == 3 and s["samples"] == 3
    with pytest.raises(ValueError, match="run.json|other settings"):
        run_eval(FiveTask(), ["autoregressive"], out_dir=tmp_path, samples=2, **common)
    for bad in (0, None, 1.5):
        with pytest.raises(ValueError, match="samples"):
            run_eval(FiveTask(), ["autoregressive"], out_dir=tmp_path / "x", **{**common,
                                                                               "samples": bad})
    corpus = FiveTask()
    corpus.per_example = False
    with pytest.raises(ValueError, match="samples=2.*corpus-level"):
        run_eval(corpus, ["autoregressive"], out_dir=tmp_path / "c", samples=2, **common)
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


def test_summary_averages_samples_per_example():
    """Each example's score is the mean of its samples; the example is the unit of the SE and
    the paired test; an example missing a sample is not summarised yet."""
    def rows(config, scores):  # scores[example][sample]
        return [{"config": config, "example_id": f"e{i}", "sample": x, "wall_s": None,
                 "new_tokens": 3, "scoring": {"score": float(v)},
                 "stats": {"tokens": 3, "verifier_calls": 3, "accepted": 1, "rejected": 1}}
                for i, per in enumerate(scores) for x, v in enumerate(per)]

    ar = [[1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]]
    cfg = [[1, 0, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]]
    data = rows("autoregressive", ar) + rows("spec_cascade/token_v3/alpha=0.3", cfg)
    s = summarize(data + rows("drafter_only", [[1, 1, 1]]), ToyTask(), bootstrap=0)
    assert s["samples"] == 3 and s["n_examples"] == 1  # drafter_only has e0 only: the common set
    s = summarize(data, ToyTask(), bootstrap=0)
    by = {p["config"]: p for p in s["configs"]}
    means_ar = [sum(x) / 3 for x in ar]
    assert by["autoregressive"]["quality"] == pytest.approx(sum(means_ar) / 4)
    assert by["autoregressive"]["tokens"] == 4 * 3 * 3 and by["autoregressive"]["n"] == 4
    d = [sum(c) / 3 - sum(a) / 3 for a, c in zip(ar, cfg)]
    vs = by["spec_cascade/token_v3/alpha=0.3"]["vs_verifier"]
    assert vs["diff"] == pytest.approx(sum(d) / 4)
    assert (vs["better"], vs["worse"]) == (1, 2)  # per example, not per sample
    lo, hi = by["autoregressive"]["quality_ci"]  # not Wilson on 12 "independent" trials
    se = (sum((m - sum(means_ar) / 4) ** 2 for m in means_ar) / 3 / 4) ** 0.5
    assert hi - lo == pytest.approx(2 * 1.959964 * se, rel=1e-4)
    incomplete = [r for r in data if not (r["example_id"] == "e3" and r["sample"] == 2)]
    s = summarize(incomplete, ToyTask(), bootstrap=0)
    assert s["n_examples"] == 3 and s["incomplete_samples"] == 2  # e3 of both configurations
    assert "2 (configuration, example) pairs lack some of their 3 samples" in to_markdown(s)
    # the run's S comes from run.json: rows of samples 0 and 1 only are not a 2-sample run
    early = [r for r in data if r["sample"] < 2]
    s = summarize(early, ToyTask(), bootstrap=0, samples=3)
    assert s["n_examples"] == 0 and s["incomplete_samples"] == 8
    assert summarize(early, ToyTask(), bootstrap=0)["samples"] == 2
    # a CI of per-example means stays within [0, 1]
    ones = rows("autoregressive", [[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    lo, hi = summarize(ones, ToyTask(), bootstrap=0)["configs"][0]["quality_ci"]
    assert 0 <= lo < hi == 1.0


# ---------------------------------------------------------------------------------------------
# latency mode


def test_latency_mode_trials_random_order_resume_and_summary(tmp_path):
    gen = counting(batch_fake)
    cfgs = ["autoregressive", "drafter_only", "spec_cascade:spec", "spec_cascade:token_v3:0.1",
            "spec_cascade:token_v3:0.5"]
    common = dict(drafter=object(), verifier=object(), tokenizer=byte_tokenizer(), seed=0,
                  out_dir=tmp_path, gamma=2, max_new_tokens=4, progress=False, chat=False,
                  generate_fn=gen, plots=False)
    run_eval(FiveTask(), cfgs, limit=5, batch_size=5, **common)
    gen.calls.clear()
    s = run_latency(FiveTask(), cfgs, limit=3, trials=2, warmup=False, **common)
    lat = load_rows(tmp_path / "latency.jsonl")
    assert len(lat) == len(gen.calls) == 5 * 3 * 2
    assert all(isinstance(c["seed"], int) for c in gen.calls)  # batch 1
    orders = [tuple(r["config"] for r in lat[i:i + 5]) for i in range(0, len(lat), 5)]
    assert len(set(orders)) > 1  # shuffled per (example, trial)
    assert {(r["example_id"], r["trial"]) for r in lat} == {
        (f"toy-{i}", t) for i in range(3) for t in range(2)}
    by = {p["config"]: p for p in s["configs"]}
    assert by["autoregressive"]["relative_latency"] == pytest.approx(1.0)
    assert by["autoregressive"]["relative_latency_per_token"] == pytest.approx(1.0)
    assert by["spec_cascade/spec"]["relative_latency"] > 0
    assert s["latency"] == {"source": "latency.jsonl", "n_examples": 3,
                            "examples": ["toy-0", "toy-1", "toy-2"], "trials": 2,
                            "timed_configs": 5}
    # the fake's tokens depend on the seed only: batch-1 and batched rows agree
    assert s["batch_invariance"] == {"compared": 30, "equal": 30}
    gen.calls.clear()
    run_latency(FiveTask(), cfgs, limit=3, trials=2, warmup=False, **common)
    assert gen.calls == []  # resumed: nothing recomputed
    run_latency(FiveTask(), cfgs, limit=3, trials=3, warmup=False, **common)
    assert len(gen.calls) == 5 * 3  # only the third trial


def test_latency_is_the_median_of_trials_and_both_definitions():
    rows = []
    for cfg, walls, tokens in (("autoregressive", [[2.0, 9.0, 2.2], [4.0, 4.0, 4.0]], [10, 20]),
                               ("spec_cascade/spec", [[1.0, 1.0, 1.0], [1.0, 3.0, 1.0]],
                                [10, 10])):
        for e, (ws, n) in enumerate(zip(walls, tokens)):
            for t, w in enumerate(ws):
                rows.append({"config": cfg, "example_id": f"e{e}", "trial": t, "wall_s": w,
                             "new_tokens": n})
    quality = [{"config": c, "example_id": f"e{e}", "wall_s": None, "scoring": {"score": 1.0},
                "stats": {"tokens": 10}} for c in ("autoregressive", "spec_cascade/spec")
               for e in range(2)]
    s = summarize(quality, ToyTask(), latency_rows=rows, bootstrap=0)
    by = {p["config"]: p for p in s["configs"]}
    assert by["spec_cascade/spec"]["relative_latency"] == pytest.approx(2.0 / 6.2)  # medians
    per_tok = (1.0 / 10 + 1.0 / 10) / 2 / ((2.2 / 10 + 4.0 / 20) / 2)
    assert by["spec_cascade/spec"]["relative_latency_per_token"] == pytest.approx(per_tok)


# ---------------------------------------------------------------------------------------------
# pre-registered plans

TOY_GRID = Grid(name="toy-grid", task="toy",
                settings={"gamma": 2, "temperature": 1.0, "max_new_tokens": 4, "seed": 0,
                          "limit": 5, "chat": False, "top_k": None, "top_p": None,
                          "bonus": None},
                curves={"references": ["autoregressive", "spec_cascade:spec"],
                        "spec_cascade[token_v3]": ["spec_cascade:token_v3:0.1",
                                                   "spec_cascade:token_v3:0.5"]},
                latency_limit=2, latency_trials=2, batch_size=2)


def _planned(tmp_path, gen, **kw):
    plan = build_plan(TOY_GRID, drafter="d", verifier="v", n_examples=5)
    args = dict(drafter=None, verifier=None, tokenizer=byte_tokenizer(), limit=5, seed=0,
                out_dir=tmp_path, gamma=2, max_new_tokens=4, progress=False, chat=False,
                generate_fn=gen, plots=False, batch_size=2, plan=plan)
    args.update(kw)
    return plan, args


def test_plan_is_written_first_and_cannot_change(tmp_path):
    gen = counting(batch_fake)
    plan, args = _planned(tmp_path, gen)
    assert plan["configs"] == ["autoregressive", "spec_cascade/spec",
                               "spec_cascade/token_v3/alpha=0.1", "spec_cascade/token_v3/alpha=0.5"]
    assert plan["budget"]["quality_generations"] == 20
    assert plan["budget"]["latency_generations"] == 4 * 2 * 2
    partial = run_eval(FiveTask(), plan["configs"][:2], **args)  # a subset of the plan runs
    assert partial["holm_family"] == 3  # adjusted for the plan's 3 comparisons, not 1
    on_disk = json.loads((tmp_path / "plan.json").read_text())
    assert on_disk["plan_sha256"] == plan["plan_sha256"]
    # a configuration outside the plan, other settings, another plan: refused, nothing run
    gen.calls.clear()
    with pytest.raises(ValueError, match="does not register spec_cascade/lossy"):
        run_eval(FiveTask(), ["spec_cascade:lossy:0.5"], **args)
    with pytest.raises(ValueError, match="registered gamma=2"):
        run_eval(FiveTask(), plan["configs"], **{**args, "gamma": 3})
    with pytest.raises(ValueError, match="does not register"):
        run_eval(FiveTask(), ["spec_cascade:lossy:0.5"], **{**args, "plan": None})
    other = build_plan(Grid(**{**TOY_GRID.__dict__, "latency_trials": 3}), drafter="d",
                       verifier="v", n_examples=5)
    with pytest.raises(ValueError, match="registers another plan .*latency"):
        run_eval(FiveTask(), plan["configs"], **{**args, "plan": other})
    with pytest.raises(ValueError, match="registered 5 examples"):
        run_eval(FiveTask(), plan["configs"], **{**args, "limit": 4})
    with pytest.raises(ValueError, match="at batch_size=2"):
        run_eval(FiveTask(), plan["configs"], **{**args, "batch_size": None})
    with pytest.raises(ValueError, match="samples=2"):  # the plan leaves samples at 1
        run_eval(FiveTask(), plan["configs"], **{**args, "samples": 2})
    # a mended description is the same plan; another setting is not
    reworded = build_plan(Grid(**{**TOY_GRID.__dict__, "description": "mended"}), drafter="d",
                          verifier="v", n_examples=5)
    run_eval(FiveTask(), plan["configs"][:1], **{**args, "plan": reworded})
    assert gen.calls == []
    # the latency protocol is the plan's
    with pytest.raises(ValueError, match="latency on 2 examples x 2 trials"):
        lat_args = {k: v for k, v in args.items() if k != "batch_size"}
        run_latency(FiveTask(), plan["configs"], **lat_args, trials=3)
    # an edited plan.json is refused
    on_disk["configs"].append("spec_cascade/lossy/alpha=0.5")
    (tmp_path / "plan.json").write_text(json.dumps(on_disk))
    with pytest.raises(ValueError, match="edited after it was registered"):
        run_eval(FiveTask(), plan["configs"], **args)


def test_a_plan_cannot_be_registered_over_rows(tmp_path):
    gen = counting(batch_fake)
    plan, args = _planned(tmp_path, gen)
    run_eval(FiveTask(), ["autoregressive"], **{**args, "plan": None})
    with pytest.raises(ValueError, match="not pre-registered"):
        run_eval(FiveTask(), ["autoregressive"], **args)


def test_cli_plan_writes_only_the_plan(tmp_path, monkeypatch, capsys):
    from speccascade_fast import models
    from speccascade_fast.eval.cli import main

    monkeypatch.setattr(models, "load_pair", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["--grid", "humaneval-main", "--plan", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["n_examples"] == 164 and plan["task"] == "humaneval"
    assert plan["settings"]["samples"] == 3  # 164 problems x 3 seeds: 492 paired samples
    assert plan["budget"]["quality_generations"] == 164 * 3 * len(plan["configs"])
    curves = plan["curves"]
    for name in ("spec_cascade[token_v3]", "spec_cascade[lossy]", "spec_cascade[opt]"):
        assert 5 <= len(curves[name]) <= 7
    assert {"spec_cascade[token_v3,bonus=verifier]", "spec_cascade[ensemble,bonus=verifier]",
            "autoregressive[min_p]", "spec_cascade[diff]", "spec_cascade[chow]",
            "spec_cascade[bild]"} <= set(curves)
    assert curves["spec_cascade[ensemble,bonus=verifier]"][0] == 1.0  # lossless end first
    # min-p at 1 - alpha of token_v3 (alpha < 1)
    assert curves["autoregressive[min_p]"] == [round(1 - a, 10)
                                               for a in curves["spec_cascade[token_v3]"] if a < 1]
    assert main(["--grid", "humaneval-main", "--plan", "--out", str(tmp_path)]) == 0  # same plan
    out = capsys.readouterr()
    assert main(["--grid", "humaneval-main", "--gamma", "4", "--plan", "--out",
                 str(tmp_path)]) == 2
    assert "grid humaneval-main registers gamma=5" in capsys.readouterr().err
    assert main(["--grid", "humaneval-main", "--batch-size", "2", "--plan", "--out",
                 str(tmp_path)]) == 2
    assert "grid humaneval-main registers 8" in capsys.readouterr().err
    assert main(["--grid", "humaneval-main", "--samples", "1", "--plan", "--out",
                 str(tmp_path)]) == 2
    assert "grid humaneval-main registers samples=3" in capsys.readouterr().err
    for g in GRIDS.values():  # every grid's configurations are valid decoding settings
        assert build_plan(g, drafter="d", verifier="v", n_examples=3)["configs"]
    assert out


# ---------------------------------------------------------------------------------------------
# configurations: bonus overrides and the min-p baseline


def test_config_bonus_and_min_p_keys():
    c = EvalConfig.parse("spec_cascade:token_v3:0.3:bonus=verifier")
    assert c.key == "spec_cascade/token_v3/alpha=0.3/bonus=verifier"
    assert c.curve == "spec_cascade[token_v3,bonus=verifier]" and c.level == 0.3
    assert c.generate_kwargs()["bonus"] == "verifier"
    m = EvalConfig.parse("autoregressive:min_p=0.7")
    assert m.key == "autoregressive/min_p=0.7" and m.curve == "autoregressive[min_p]"
    assert not m.is_reference and EvalConfig("autoregressive").is_reference
    assert m.generate_kwargs() == {"method": "autoregressive", "min_p": 0.7}
    assert EvalConfig.parse(m.key) == m and EvalConfig.parse(c.key) == c
    for bad in ("spec_cascade:token_v3:0.3:bonus=both", "drafter_only:min_p=0.5",
                "autoregressive:min_p=0", "spec_cascade:token_v3:0.3:min_p=0.5",
                "autoregressive:bonus=verifier"):
        with pytest.raises(ValueError):
            EvalConfig.parse(bad)


# ---------------------------------------------------------------------------------------------
# statistics


def test_holm_and_wilson():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 5)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson(5, 5)[1] == pytest.approx(1.0)


def _qrows(config, scores):
    return [{"config": config, "example_id": f"e{i}", "wall_s": None,
             "scoring": {"score": float(s)},
             "stats": {"tokens": 10, "verifier_calls": 2, "accepted": 3, "rejected": 1}}
            for i, s in enumerate(scores)]


def _lrows(config, walls):
    return [{"config": config, "example_id": f"e{i}", "trial": 0, "wall_s": w, "new_tokens": 10}
            for i, w in enumerate(walls)]


def test_pooled_verifier_holm_and_table2_cis():
    n = 60
    ar = [1] * 45 + [0] * 15
    spec = [1] * 40 + [0] * 20
    good = [1] * 48 + [0] * 12
    bad = [1] * 20 + [0] * 40
    rows = (_qrows("autoregressive", ar) + _qrows("spec_cascade/spec", spec)
            + _qrows("spec_cascade/token_v3/alpha=0.1", good)
            + _qrows("spec_cascade/token_v3/alpha=0.9", bad)
            + _qrows("spec_cascade/opt/alpha=1.0", bad))
    lat = (_lrows("autoregressive", [2.0] * n) + _lrows("spec_cascade/spec", [1.2] * n)
           + _lrows("spec_cascade/token_v3/alpha=0.1", [1.1] * n)
           + _lrows("spec_cascade/token_v3/alpha=0.9", [0.8] * n)
           + _lrows("spec_cascade/opt/alpha=1.0", [0.9] * n))
    s = summarize(rows, ToyTask(), latency_rows=lat, bootstrap=400)
    pooled = s["verifier_pooled"]
    assert pooled["sources"] == ["autoregressive", "spec_cascade/spec"]
    assert pooled["quality"] == pytest.approx((45 + 40) / 120)
    by = {p["config"]: p for p in s["configs"]}
    ps = [by[k]["vs_verifier"]["sign_p"] for k in by if k != "autoregressive"]
    adj = [by[k]["vs_verifier"]["sign_p_holm"] for k in by if k != "autoregressive"]
    assert adj == pytest.approx(holm(ps))
    assert by["spec_cascade/opt/alpha=1.0"]["vs_verifier"]["resolved"]  # 25 worse, 0 better
    assert not by["spec_cascade/token_v3/alpha=0.1"]["vs_verifier"]["resolved"]
    lo, hi = by["autoregressive"]["quality_ci"]
    assert lo < 0.75 < hi
    t2 = {t["curve"]: t for t in s["table2"]}
    tok = t2["spec_cascade[token_v3]"]
    assert tok["speedup_at_verifier_quality"] > 1
    assert tok["reached"] in ("reached", "unresolved")
    assert 0 <= tok["reached_fraction"] <= 1 and len(tok["speedup_ci"]) == 2
    assert t2["spec_cascade[opt]"]["reached"] == "not reached"
    assert t2["spec_cascade[spec]"]["reached"] == "lossless"
    assert t2["spec_cascade[spec]"]["speedup_at_verifier_quality"] == pytest.approx(2 / 1.2)
    assert "speedup_at_verifier_quality_per_token" in tok
    md = __import__("speccascade_fast.eval.summary", fromlist=["to_markdown"]).to_markdown(s)
    assert "Holm p" in md and "pooled" in md and "lossless" in md


# ---------------------------------------------------------------------------------------------
# plots


def test_every_grid_curve_has_a_fixed_distinct_style(tmp_path):
    curves = {c for g in GRIDS.values() for c in g.curves if c != "references"}
    curves |= {"autoregressive", "drafter_only", "spec_cascade[spec]"}
    assert curves <= set(STYLES)
    pairs = [STYLES[c][:2] for c in curves]
    assert len(set(pairs)) == len(pairs)  # no two methods share colour and marker
    assert style("spec_cascade[made_up]") == style("spec_cascade[made_up]")


def test_plots_and_table2_figure_are_written(tmp_path):
    from speccascade_fast.eval.plots import plot_summary

    rows = (_qrows("autoregressive", [1, 0, 1, 1]) + _qrows("spec_cascade/spec", [1, 1, 0, 1])
            + _qrows("spec_cascade/token_v3/alpha=0.1", [1, 1, 1, 0])
            + _qrows("spec_cascade/token_v3/alpha=0.5", [1, 0, 0, 0]))
    lat = (_lrows("autoregressive", [2.0] * 4) + _lrows("spec_cascade/spec", [1.0] * 4)
           + _lrows("spec_cascade/token_v3/alpha=0.1", [1.1] * 4)
           + _lrows("spec_cascade/token_v3/alpha=0.5", [0.9] * 4))
    s = summarize(rows, ToyTask(), latency_rows=lat, bootstrap=50)
    s["settings"] = {"temperature": 1.0, "gamma": 5, "drafter": "/x/small", "verifier": "big"}
    paths = plot_summary(s, tmp_path)
    assert [p.name for p in paths] == ["quality_vs_latency.png", "quality_vs_rejection.png",
                                       "quality_vs_verifier_calls.png", "table2.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not math.isnan(s["verifier_pooled"]["quality"])
    from speccascade_fast.eval.plots import title_of

    assert title_of(s).startswith("toy: n = 4, T = 1.0") and "samples" not in title_of(s)
    assert title_of({**s, "samples": 3}).startswith("toy: n = 4 × 3 samples, T = 1.0")
    from speccascade_fast.eval.plots import caption_of

    assert "Wilson" in caption_of(s) and "bootstrap SE over segments" not in caption_of(s)
    assert "bootstrap SE over segments" in caption_of({**s, "metric": "BLEU"})


def test_budget_sweep_summary_and_plot(tmp_path):
    from speccascade_fast.eval.plots import plot_summary
    from speccascade_fast.eval.summary import to_markdown

    def spent(config, values):
        rows = _qrows(config, [1, 0, 1, 1])
        for r, v in zip(rows, values):
            r["stats"] = {**r["stats"], "divergence_spent": v}
        return rows

    rows = (_qrows("autoregressive", [1, 0, 1, 1]) + _qrows("spec_cascade/token_v3/alpha=0.6",
                                                            [1, 1, 0, 1])
            + spent("spec_cascade/token_v3/alpha=0.6/budget=0", [0, 0, 0, 0])
            + spent("spec_cascade/token_v3/alpha=0.6/budget=0.5", [0.5, 0.25, 0.0, 0.5])
            + spent("spec_cascade/token_v3/alpha=0.6/budget=2", [1.5, 0.5, 0.0, 2.0]))
    s = summarize(rows, ToyTask(), bootstrap=20)
    by = {p["config"]: p for p in s["configs"]}
    half = by["spec_cascade/token_v3/alpha=0.6/budget=0.5"]
    assert half["divergence_spent_mean"] == pytest.approx(0.3125)
    assert half["divergence_spent_max"] == 0.5
    assert "divergence_spent_mean" not in by["spec_cascade/token_v3/alpha=0.6"]  # not measured
    # a budget of 0 is the verifier's law: pooled with the verifier
    assert s["verifier_pooled"]["sources"] == ["autoregressive",
                                               "spec_cascade/token_v3/alpha=0.6/budget=0"]
    md = to_markdown(s)
    assert "## Divergence budgets" in md and "| `spec_cascade/token_v3/alpha=0.6/budget=2` | 2 |" in md
    s["settings"] = {"temperature": 1.0, "gamma": 5, "drafter": "/x/small", "verifier": "big"}
    paths = plot_summary(s, tmp_path)
    assert paths[-1].name == "quality_vs_budget.png" and paths[-1].stat().st_size > 1000
    # no budget anywhere: no budget figure
    plain = summarize(rows[:8], ToyTask(), bootstrap=20)
    plain["settings"] = s["settings"]
    assert "quality_vs_budget.png" not in [p.name for p in plot_summary(plain, tmp_path / "p")]
