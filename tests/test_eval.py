"""The evaluation harness (speccascade_fast.eval): end to end on tiny random models, resume,
argument checks, the output-folder lock, the Table-2 interpolation, GSM8K extraction and BLEU.
CPU, seconds. The HumanEval sandbox has its own module, tests/test_sandbox.py."""
from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest
import torch

from speccascade_fast.eval import (
    EvalConfig,
    Example,
    best_quality_within,
    latency_to_reach,
    load_rows,
    make_configs,
    run_eval,
    summarize,
    write_summary,
)
from speccascade_fast.eval.cli import add_eval_subcommand, build_configs, main, parse_alphas
from speccascade_fast.eval.summary import holm, sign_test_p, to_markdown, upper_concave_hull
from speccascade_fast.eval.tasks import data_root, get_task, truncate_at_stop
from speccascade_fast.eval.tasks.gsm8k import (
    exemplar_solution,
    extract_answer,
    normalise_number,
    reference_answer,
)
from speccascade_fast.eval.tasks.humaneval import extract_code
from speccascade_fast.eval.tasks.wmt14 import corpus_bleu_with_se

from .eval_helpers import ToyTask, byte_tokenizer, counting, tiny_llama

try:  # the real engine when it is there; the harness only needs its signature
    from speccascade_fast import generate as ENGINE_GENERATE
except ImportError:  # pragma: no cover - only while the engine is missing
    ENGINE_GENERATE = None


# ---------------------------------------------------------------------------------------------
# a fake engine and the tiny pair (the tokenizer, models and toy task: tests/eval_helpers.py)


def fake_generate(drafter, verifier, input_ids, *, method="spec_cascade", rule=None, alpha=None,
                  gamma=5, max_new_tokens=8, seed=0, **kw):
    """Same signature and output shape as engine.generate; random tokens, plausible stats."""
    g = torch.Generator().manual_seed(seed + 7919 * len(method) + int(1000 * (alpha or 0)))
    new = torch.randint(0, 256, (1, max_new_tokens), generator=g)
    n = max_new_tokens
    rej = 0 if method in ("autoregressive", "drafter_only") else int(n * (1 - (alpha or 0)) / 3)
    stats = {"tokens": n, "verifier_calls": n if method == "autoregressive" else 1 + rej,
             "drafter_calls": 0 if method == "autoregressive" else n, "drafted": n,
             "accepted": n - rej, "rejected": rej, "deferred": rej, "wall_s": 0.0}
    out = argparse.Namespace(sequences=torch.cat([input_ids.cpu(), new], 1), stats=stats,
                             new_tokens=[new[0].tolist()])
    return out


@pytest.fixture(scope="module")
def tiny_pair():
    tok = byte_tokenizer()
    V = len(tok)
    return tiny_llama(V, 1, seed=1), tiny_llama(V, 2, seed=2), tok


def _sweep():
    return make_configs(["spec_cascade", "token_cascade"], ["token_v3", "chow"],
                        {"token_v3": [0.0, 0.5], "chow": [0.3]})


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    CONFIGS = _sweep()


# ---------------------------------------------------------------------------------------------
# end to end and resume


def test_make_configs_expands_and_filters():
    with pytest.warns(UserWarning, match="skipping token_cascade with rule 'token_v3'"):
        assert _sweep() == CONFIGS
    keys = [c.key for c in CONFIGS]
    assert keys == [
        "autoregressive", "drafter_only", "spec_cascade/token_v3/alpha=0.0",
        "spec_cascade/token_v3/alpha=0.5", "spec_cascade/chow/alpha=0.3",
        "token_cascade/chow/alpha=0.3",  # token_cascade/token_v3 skipped: not a q-only rule
    ]
    assert EvalConfig.parse("spec_cascade:token_v3:0.5") == CONFIGS[3]
    assert EvalConfig.parse(CONFIGS[3].key) == CONFIGS[3]
    assert EvalConfig.parse("seq_cascade:0.5") == EvalConfig("seq_cascade", None, 0.5)
    assert CONFIGS[3].generate_kwargs() == {"method": "spec_cascade", "rule": "token_v3",
                                            "alpha": 0.5}
    assert [c.key for c in make_configs(["spec_cascade"], ["spec"], [0.1, 0.2])][-1] == \
        "spec_cascade/spec"


def test_end_to_end_real_engine_and_resume(tiny_pair, tmp_path):
    """The whole harness on a tiny random pair with the real engine (fake only if absent)."""
    drafter, verifier, tok = tiny_pair
    gen = counting(ENGINE_GENERATE or fake_generate)
    common = dict(drafter=drafter, verifier=verifier, tokenizer=tok, limit=2, seed=3,
                  out_dir=tmp_path, gamma=3, temperature=1.0, max_new_tokens=10, progress=False,
                  chat=False, generate_fn=gen)
    summary = run_eval(ToyTask(), CONFIGS, **common)

    rows = load_rows(tmp_path / "rows.jsonl")
    assert len(rows) == len(CONFIGS) * 2
    distinct = {(c.method, c.rule) for c in CONFIGS}
    assert len(gen.calls) == len(rows) + len(distinct)  # + one untimed warm-up per (method, rule)
    r = rows[0]
    for field in ("config", "example_id", "prompt", "output", "prediction", "scoring", "stats",
                  "wall_s", "seed"):
        assert field in r
    assert r["prompt"] == "Q: abc\nA:"
    assert set(r["scoring"]) == {"score", "prediction_len"}
    assert "\n" not in r["prediction"]
    # the same example gets the same engine seed in every configuration
    assert len({x["seed"] for x in rows if x["example_id"] == "toy-0"}) == 1
    for x in rows:
        assert x["new_tokens"] <= 10 and x["stats"]["tokens"] == x["new_tokens"]

    by = {p["config"]: p for p in summary["configs"]}
    assert by["autoregressive"]["relative_latency"] == pytest.approx(1.0)
    assert by["autoregressive"]["rejection_rate"] == 0.0 or \
        by["autoregressive"]["rejection_rate"] is None
    assert by["drafter_only"]["verifier_calls_per_token"] == 0.0
    sc = by["spec_cascade/token_v3/alpha=0.5"]
    assert 0 < sc["relative_latency"] < math.inf
    assert 0 <= sc["rejection_rate"] <= 1
    assert sc["verifier_calls_per_token"] == pytest.approx(sc["verifier_calls"] / sc["tokens"])
    assert {t["curve"] for t in summary["table2"]} == {
        "spec_cascade[token_v3]", "spec_cascade[chow]", "token_cascade[chow]"}
    for name in ("summary.json", "summary.md", "run.json", "quality_vs_latency.png",
                 "quality_vs_rejection.png", "quality_vs_verifier_calls.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["n_examples"] == 2
    assert "Table 2" in (tmp_path / "summary.md").read_text()

    # resume: nothing is recomputed
    gen.calls.clear()
    common["plots"] = False  # drawn once above; keeps the test fast
    again = run_eval(ToyTask(), CONFIGS, **common)
    assert gen.calls == []
    assert len(load_rows(tmp_path / "rows.jsonl")) == len(rows)
    assert again["configs"] == summary["configs"]

    # a new configuration: only its rows (plus its warm-up) are computed
    extra = EvalConfig("spec_cascade", "token_v3", 0.2)
    run_eval(ToyTask(), CONFIGS + [extra], **common)
    assert len(gen.calls) == 2 + 1
    assert all(c.get("alpha") == 0.2 for c in gen.calls)

    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        run_eval(ToyTask(), CONFIGS, **{**common, "gamma": 4})


def test_fake_engine_resume_after_torn_row(tmp_path):
    """An interrupted write (torn last line) is dropped and that row recomputed."""
    gen = counting(fake_generate)
    common = dict(drafter=object(), verifier=object(), tokenizer=byte_tokenizer(), limit=2,
                  seed=0, out_dir=tmp_path, gamma=2, temperature=1.0, max_new_tokens=5,
                  progress=False, chat=False, generate_fn=gen, warmup=False, plots=False)
    cfgs = ["autoregressive", "spec_cascade:token_v3:0.1"]
    run_eval(ToyTask(), cfgs, **common)
    assert len(gen.calls) == 4
    path = tmp_path / "rows.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:20])  # the 4th row torn mid-write
    gen.calls.clear()
    run_eval(ToyTask(), cfgs, **common)
    assert len(gen.calls) == 1
    rows = load_rows(path)
    assert len(rows) == 4 and len({(r["config"], r["example_id"]) for r in rows}) == 4


def test_stop_tokens_end_generation_at_newline_tokens(tmp_path):
    """One-character stop strings become extra EOS ids for the engine."""
    gen = counting(fake_generate)
    tok = byte_tokenizer()
    run_eval(ToyTask(), ["autoregressive"], drafter=None, verifier=object(), tokenizer=tok,
             limit=1, seed=0, out_dir=tmp_path, progress=False, chat=False, generate_fn=gen,
             warmup=False, plots=False)
    eos = gen.calls[0]["eos_token_id"]
    nl = tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]
    assert nl in eos and tok.eos_token_id in eos


def test_seq_score_reaches_generate_and_is_a_resume_setting(tmp_path):
    """``seq_score`` goes to every generate call; a folder run without it refuses a run with it
    (and the other way round), since the seq_cascade rows would differ."""
    gen = counting(fake_generate)
    common = dict(drafter=object(), verifier=object(), tokenizer=byte_tokenizer(), limit=1,
                  seed=0, gamma=2, max_new_tokens=3, progress=False, chat=False,
                  generate_fn=gen, warmup=False, plots=False)
    run_eval(ToyTask(), ["autoregressive", "seq_cascade:0.3"], out_dir=tmp_path / "a",
             seq_score="mean_logprob", **common)
    assert [c["seq_score"] for c in gen.calls] == ["mean_logprob"] * 2
    assert json.loads((tmp_path / "a" / "run.json").read_text())["seq_score"] == "mean_logprob"
    with pytest.raises(ValueError, match="seq_score"):
        run_eval(ToyTask(), ["seq_cascade:0.3"], out_dir=tmp_path / "a", **common)
    gen.calls.clear()
    run_eval(ToyTask(), ["seq_cascade:0.3"], out_dir=tmp_path / "b", **common)
    assert "seq_score" not in gen.calls[0]
    assert "seq_score" not in json.loads((tmp_path / "b" / "run.json").read_text())
    with pytest.raises(ValueError, match="seq_score"):
        run_eval(ToyTask(), ["seq_cascade:0.3"], out_dir=tmp_path / "b", seq_score="prob",
                 **common)


# ---------------------------------------------------------------------------------------------
# argument checks before any write, the output-folder lock, summaries of missing folders


def _toy_run(tmp_path, **kw):
    args = dict(drafter=object(), verifier=object(), tokenizer=byte_tokenizer(), limit=2, seed=0,
                out_dir=tmp_path / "out", gamma=2, temperature=1.0, max_new_tokens=3,
                progress=False, chat=False, generate_fn=fake_generate, warmup=False, plots=False)
    args.update(kw)
    return run_eval(ToyTask(), ["autoregressive", "spec_cascade:token_v3:0.1"], **args)


@pytest.mark.parametrize("kw, name", [
    ({"limit": 0}, "limit"), ({"limit": -1}, "limit"), ({"limit": 1.5}, "limit"),
    ({"limit": True}, "limit"), ({"seed": "0"}, "seed"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"gamma": 0}, "gamma"), ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"top_p": 1.5}, "top_p"), ({"bonus": "both"}, "bonus"), ({"seq_score": "x"}, "seq_score"),
    ({"chat": "yes"}, "chat"), ({"eos_token_id": -1}, "eos_token_id"),
    ({"table2_tol": -0.1}, "table2_tol"), ({"table2_envelope": "hull"}, "table2_envelope"),
    ({"task_kwargs": [1]}, "task_kwargs"), ({"unsafe_local_exec": "yes"}, "unsafe_local_exec"),
])
def test_run_eval_checks_every_argument_before_writing(tmp_path, kw, name):
    """A bad argument is a ValueError naming it, and nothing is written: the corrected command
    then runs (a run.json written first would pin the bad settings and refuse it)."""
    with pytest.raises(ValueError, match=name):
        _toy_run(tmp_path, **kw)
    assert not (tmp_path / "out").exists()
    assert _toy_run(tmp_path)["n_examples"] == 2


def test_run_eval_limit_is_honoured(tmp_path):
    assert _toy_run(tmp_path, limit=1)["n_examples"] == 1
    rows = load_rows(tmp_path / "out" / "rows.jsonl")
    assert {r["example_id"] for r in rows} == {"toy-0"}


def test_output_folder_is_locked_while_written(tmp_path):
    from speccascade_fast.eval import harness

    out = tmp_path / "out"
    out.mkdir()
    with harness._FolderLock(out):  # another writer (a second open file: flock conflicts)
        with pytest.raises(harness.OutputLockedError, match=r"pid \d+ on .*lock file") as e:
            _toy_run(tmp_path)
        assert isinstance(e.value, OSError) and str(out) in str(e.value)
        assert not (out / "run.json").exists()
        with pytest.raises(harness.OutputLockedError):
            harness.write_summary(out, ToyTask(), rows=[], plots=False)
    _toy_run(tmp_path)  # released: the run goes ahead
    assert (out / ".lock").read_text() == ""  # and releases it in turn
    # a lock held by another process names that process
    import subprocess
    import sys
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from speccascade_fast.eval import harness; "
         "from pathlib import Path; l = harness._FolderLock(Path(sys.argv[1])).__enter__(); "
         "print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(harness.OutputLockedError, match=f"pid {holder.pid} on "):
            _toy_run(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    _toy_run(tmp_path)  # the holder died: its lock went with it


def test_summary_of_a_missing_folder_fails_without_creating_it(tmp_path, capsys):
    from speccascade_fast.cli import main as speccascade

    missing = tmp_path / "nope"
    for cli in (main, lambda argv: speccascade(["eval", *argv])):
        assert cli(["--task", "gsm8k", "--out", str(missing), "--summary-only",
                    "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no such output folder" in err, err
        assert not missing.exists()
    (tmp_path / "empty").mkdir()
    assert main(["--task", "gsm8k", "--out", str(tmp_path / "empty"), "--summary-only",
                 "--no-plots"]) == 2
    assert "rows.jsonl not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such output folder"):
        write_summary(missing, "gsm8k", plots=False)
    assert not missing.exists()


def test_humaneval_without_bwrap_is_refused_or_marked_unsandboxed(tmp_path, monkeypatch):
    """No bubblewrap: refused before anything is written, unless unsafe_local_exec; then every
    summary says the run was unsandboxed."""
    from speccascade_fast.eval import sandbox

    monkeypatch.setattr(sandbox, "_PROBE", {"": (None, "bubblewrap (bwrap) is not installed")})
    tok = byte_tokenizer()

    def answer(drafter, verifier, input_ids, *, max_new_tokens=8, **kw):
        new = torch.tensor([tok.encode("    return []\n") + [tok.eos_token_id]])
        return argparse.Namespace(sequences=torch.cat([input_ids.cpu(), new], 1),
                                  stats={"tokens": new.shape[1]}, new_tokens=[new[0].tolist()])

    args = dict(drafter=None, verifier=object(), tokenizer=tok, limit=1, seed=0,
                out_dir=tmp_path / "he", progress=False, chat=False, generate_fn=answer,
                warmup=False, plots=False, max_new_tokens=4)
    with pytest.raises(sandbox.SandboxUnavailableError, match="--unsafe-local-exec"):
        run_eval("humaneval", ["autoregressive"], **args)
    assert not (tmp_path / "he").exists()
    s = run_eval("humaneval", ["autoregressive"], unsafe_local_exec=True, **args)
    assert s["sandbox"] == {"rows": 1, "unsandboxed_rows": 1, "mode": "unsafe-local"}
    assert (tmp_path / "he" / "summary.md").read_text().startswith("> **UNSANDBOXED**")
    row = load_rows(tmp_path / "he" / "rows.jsonl")[0]
    assert row["scoring"]["sandbox"] == "unsafe-local" and row["scoring"]["status"] == "failed"
    assert json.loads((tmp_path / "he" / "summary.json").read_text())["sandbox"]["mode"] == (
        "unsafe-local")


# ---------------------------------------------------------------------------------------------
# Table 2: interpolation on synthetic curves with known answers


def test_interpolation_monotone_curve():
    pts = [(1.2, 1.0), (0.5, 0.6), (0.8, 0.9)]  # unsorted on purpose
    assert latency_to_reach(pts, 0.8) == pytest.approx(0.5 + (0.2 / 0.3) * 0.3)  # 0.7
    assert 1 / latency_to_reach(pts, 0.8) == pytest.approx(1 / 0.7)
    assert best_quality_within(pts, 1.0) == pytest.approx(0.95)  # 0.9 + 0.5 * 0.1
    assert latency_to_reach(pts, 0.6) == pytest.approx(0.5)  # cheapest point already there
    assert latency_to_reach(pts, 0.5) == pytest.approx(0.5)  # no extrapolation below it
    assert latency_to_reach(pts, 1.01) is None  # not reached
    assert best_quality_within(pts, 0.4) is None  # every point slower
    assert best_quality_within([(0.5, 0.6)], 1.0) == 0.6


def test_interpolation_non_monotone_curve_uses_running_max():
    pts = [(0.4, 0.9), (0.6, 0.5), (1.5, 1.0)]
    assert latency_to_reach(pts, 0.8) == pytest.approx(0.4)
    assert latency_to_reach(pts, 0.95) == pytest.approx(0.6 + (0.45 / 0.5) * 0.9)  # 1.41
    assert best_quality_within(pts, 1.0) == pytest.approx(0.9)
    # the interpolated value at L = 1 on the rising segment, when it is the maximum
    assert best_quality_within([(0.4, 0.2), (0.6, 0.5), (1.5, 1.0)], 1.0) == \
        pytest.approx(0.5 + 0.4 / 0.9 * 0.5)
    # equal latencies: a vertical step is crossed at that latency
    assert latency_to_reach([(0.7, 0.5), (0.7, 0.9), (1.0, 1.0)], 0.8) == pytest.approx(0.7)


def test_interpolation_concave_envelope():
    pts = [(0.5, 0.5), (0.7, 0.55), (1.0, 1.0), (1.2, 0.9)]
    assert upper_concave_hull(pts) == [(0.5, 0.5), (1.0, 1.0)]
    assert latency_to_reach(pts, 0.8) == pytest.approx(0.7 + 0.25 / 0.45 * 0.3)
    assert latency_to_reach(pts, 0.8, envelope="concave") == pytest.approx(0.8)
    assert best_quality_within(pts, 0.9, envelope="concave") == pytest.approx(0.9)
    assert latency_to_reach(pts, 0.99, tol=0.01) == pytest.approx(0.7 + 0.43 / 0.45 * 0.3)


def _rows(config, walls, scores, rej=0, acc=0, vcalls=None):
    out = []
    for i, (w, s) in enumerate(zip(walls, scores)):
        out.append({"config": config, "example_id": f"e{i}", "wall_s": w,
                    "scoring": {"score": s},
                    "stats": {"tokens": 10, "verifier_calls": 10 if vcalls is None else vcalls,
                              "drafter_calls": 0, "accepted": acc, "rejected": rej}})
    return out


def test_summarize_table2_from_rows():
    """Relative latency is a ratio of sums; the Table-2 figures follow from the curve."""
    rows = (_rows("autoregressive", [1.0, 3.0], [1, 0])  # Q_v = 0.5, 4 s
            + _rows("drafter_only", [0.5, 0.5], [0, 0], vcalls=0)
            + _rows("spec_cascade/token_v3/alpha=0.1", [1.0, 1.0], [1, 1], rej=1, acc=3,
                    vcalls=2)  # L = 0.5, Q = 1
            + _rows("spec_cascade/token_v3/alpha=0.9", [0.5, 0.5], [0, 0], rej=0, acc=4,
                    vcalls=1)  # L = 0.25, Q = 0
            + _rows("spec_cascade/lossy/alpha=0.5", [3.0, 3.0], [0, 1], rej=2, acc=2))
    s = summarize(rows, ToyTask())
    by = {p["config"]: p for p in s["configs"]}
    assert by["spec_cascade/token_v3/alpha=0.1"]["relative_latency"] == pytest.approx(0.5)
    assert by["spec_cascade/token_v3/alpha=0.1"]["rejection_rate"] == pytest.approx(0.25)
    assert by["spec_cascade/token_v3/alpha=0.1"]["verifier_calls_per_token"] == pytest.approx(0.2)
    assert by["autoregressive"]["quality"] == 0.5
    assert by["autoregressive"]["quality_se"] == pytest.approx(0.5)  # std([1, 0]) / sqrt(2)
    t2 = {t["curve"]: t for t in s["table2"]}
    tok = t2["spec_cascade[token_v3]"]
    # curve (0.25, 0) -> (0.5, 1): reaches Q_v = 0.5 at L = 0.375, speed-up 8/3
    assert tok["latency_at_verifier_quality"] == pytest.approx(0.375)
    assert tok["speedup_at_verifier_quality"] == pytest.approx(8 / 3)
    assert tok["best_quality_within_verifier_latency"] == pytest.approx(1.0)
    lossy = t2["spec_cascade[lossy]"]  # one point at L = 1.5, Q = 0.5
    assert lossy["speedup_at_verifier_quality"] == pytest.approx(1 / 1.5)
    assert lossy["best_quality_within_verifier_latency"] is None
    # an example missing in one configuration is left out everywhere
    s2 = summarize(rows[:-1], ToyTask())
    assert s2["n_examples"] == 1 and s2["examples"] == ["e0"]


def test_paired_comparison_with_the_verifier():
    """Δ quality per example against autoregressive, its paired SE and the exact sign test."""
    ar = [1, 1, 0, 1, 0, 1, 1, 0]
    cfg = [1, 0, 0, 1, 1, 0, 0, 0]  # 1 better (e4), 3 worse (e1, e5, e6): Δ = -2/8
    rows = _rows("autoregressive", [1.0] * 8, ar) + _rows("spec_cascade/spec", [0.5] * 8, cfg)
    s = summarize(rows, ToyTask())
    by = {p["config"]: p for p in s["configs"]}
    d = by["spec_cascade/spec"]["vs_verifier"]
    assert d["diff"] == pytest.approx(-0.25) and (d["better"], d["worse"]) == (1, 3)
    diffs = [c - a for c, a in zip(cfg, ar)]
    sd = (sum((x + 0.25) ** 2 for x in diffs) / 7) ** 0.5
    assert d["diff_se"] == pytest.approx(sd / 8**0.5)
    assert d["sign_p"] == pytest.approx(2 * (1 + 4) / 16)  # P(<= 1 of 4 | 1/2), two-sided
    assert by["autoregressive"]["vs_verifier"]["diff"] == 0.0
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert "## Paired with the verifier" in to_markdown(s)
    # a partial run of a registered grid is adjusted for the whole grid's comparisons
    wide = summarize(rows, ToyTask(), holm_family=5)
    d5 = {p["config"]: p for p in wide["configs"]}["spec_cascade/spec"]["vs_verifier"]
    assert d5["sign_p_holm"] == pytest.approx(min(1.0, 5 * d["sign_p"]))
    assert wide["holm_family"] == 5 and "over the 5 comparisons of the grid" in to_markdown(wide)
    assert s["holm_family"] == 1
    # corpus-level metrics (BLEU) are not compared example by example
    corpus = ToyTask()
    corpus.per_example = False
    assert "vs_verifier" not in summarize(rows, corpus)["configs"][0]


# ---------------------------------------------------------------------------------------------
# HumanEval (its sandbox, with the escape attempts: tests/test_sandbox.py)


def test_extract_code():
    assert extract_code("x\n```python\nprint(1)\n```\ny") == "print(1)\n"
    assert extract_code("```\nprint(2)\n") == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"


# ---------------------------------------------------------------------------------------------
# GSM8K and WMT14


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7.\nThe answer is 7.", "7"),
    ("The answer is $1,234.", "1234"),
    ("The answer is: 18.00", "18"),
    ("The answer is -3.5 dollars", "-3.5"),
    ("we get 10 apples, then 12\n#### 12", "12"),
    ("First 5, then 6, so he has 11 left", "11"),
    ("the answer is 4. The answer is 5.", "5"),
    ("no number here", None),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_reference_and_exemplars():
    ans = "He buys 2*3=<<2*3=6>>6 apples.\n#### 1,006"
    assert reference_answer(ans) == "1006"
    assert exemplar_solution(ans) == "He buys 2*3=6 apples.\nThe answer is 1,006."
    assert normalise_number("1,000.50") == "1000.5" and normalise_number("abc") is None
    assert truncate_at_stop("A 5.\n\nQuestion: next", ("\n\nQuestion:",)) == "A 5."


def _need_data(*parts):
    path = data_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"evaluation data not found at {path}")


def test_gsm8k_task_prompt_and_score():
    _need_data("gsm8k", "test.jsonl")
    task = get_task("gsm8k")
    ex = task.examples(2)
    assert [e.id for e in ex] == ["gsm8k-test-0", "gsm8k-test-1"]
    prompt = task.build_prompt(ex[0])
    assert prompt.count("Question:") == 9 and prompt.endswith("Answer:")
    assert "<<" not in prompt and ex[0].data["question"].strip() in prompt
    pred = task.postprocess(ex[0], " 16 - 3 - 4 = 9, 9 * 2 = 18. The answer is 18.\n\nQuestion: x")
    assert task.score(ex[0], pred) == {"score": 1.0, "extracted": "18", "reference": "18"}
    assert task.score(ex[0], "The answer is 17.")["score"] == 0.0


def test_data_root_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCASCADE_DATA", str(tmp_path))
    assert data_root() == tmp_path
    with pytest.raises(FileNotFoundError, match="SPECCASCADE_DATA"):
        get_task("gsm8k").examples(1)


def test_bleu_toy_pair():
    import sacrebleu

    hyps = ["the cat sat on the mat", "a dog barked loudly today"]
    refs = ["the cat sat on the mat", "the dog barked loudly"]
    score, se = corpus_bleu_with_se(hyps, refs, n_boot=200)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < score < 100 and se > 0
    same = ["Guten Morgen , wie geht es dir heute ?"]
    assert corpus_bleu_with_se(same, same) == (pytest.approx(100.0), 0.0)


_REFS = ["der Hund bellt heute sehr laut im Garten", "die Katze sitzt auf der Matte",
         "wir fahren morgen mit dem Zug nach Berlin", "das Wetter ist heute schön und warm",
         "er liest ein Buch über alte Schiffe", "sie trinkt jeden Morgen einen Kaffee",
         "die Kinder spielen im Park Fußball", "ich habe meinen Schlüssel verloren"]


def _bleu_rows(config, hyps):
    return [{"config": config, "example_id": f"s{i}", "wall_s": None, "new_tokens": 5,
             "stats": {"tokens": 5}, "scoring": {"hypothesis": h, "reference": r}}
            for i, (h, r) in enumerate(zip(hyps, _REFS))]


def test_bleu_segment_statistics_sum_to_corpus_bleu():
    import sacrebleu

    task = get_task("wmt14")
    hyps = ["der Hund bellt laut", "eine Katze sitzt auf einer Matte", "wir fahren nach Berlin"]
    scoring = [{"hypothesis": h, "reference": r} for h, r in zip(hyps, _REFS)]
    stats = task.segment_stats(scoring)
    assert stats.shape[0] == 3
    assert task.score_from_stats(stats.sum(0)) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [_REFS[:3]]).score)
    assert task.score_from_stats(stats[[0, 0, 2]].sum(0)) == pytest.approx(
        sacrebleu.corpus_bleu([hyps[0], hyps[0], hyps[2]], [[_REFS[0]] * 2 + [_REFS[2]]]).score)


def test_corpus_metric_paired_bootstrap_with_holm():
    """BLEU configurations are compared with the verifier by the paired bootstrap over segments:
    a copy of the verifier's hypotheses differs by 0 (p = 1), the references themselves are
    resolved better, and the pooled verifier is the BLEU of both verifier-law corpora."""
    import sacrebleu

    task = get_task("wmt14")
    ar = ["der Hund bellt laut", "eine Katze sitzt auf einer Matte", "wir fahren nach Berlin",
          "das Wetter ist gut", "er liest ein Buch", "sie trinkt Kaffee am Morgen",
          "Kinder spielen Fußball", "ich habe den Schlüssel verloren"]
    spec = ["der Hund bellt heute laut", "die Katze sitzt auf der Matte", "wir fahren nach Bonn",
            "das Wetter ist heute gut", "er liest Bücher", "sie trinkt Tee",
            "die Kinder spielen im Park", "ich habe meinen Schlüssel"]
    rows = (_bleu_rows("autoregressive", ar) + _bleu_rows("spec_cascade/spec", spec)
            + _bleu_rows("drafter_only", ar) + _bleu_rows("spec_cascade/lossy/alpha=0.5", _REFS))
    s = summarize(rows, task, bootstrap=400, seed=1)
    by = {p["config"]: p for p in s["configs"]}
    same = by["drafter_only"]["vs_verifier"]
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["p"] == 1.0
    best = by["spec_cascade/lossy/alpha=0.5"]["vs_verifier"]
    assert best["diff"] > 50 and best["ci"][0] > 0 and best["p"] == pytest.approx(1 / 401)
    assert best["resolved"] and not same["resolved"]
    ps = [by[k]["vs_verifier"]["p"] for k in ("spec_cascade/spec", "drafter_only",
                                               "spec_cascade/lossy/alpha=0.5")]
    assert [by[k]["vs_verifier"]["p_holm"] for k in ("spec_cascade/spec", "drafter_only",
                                                      "spec_cascade/lossy/alpha=0.5")] \
        == pytest.approx(holm(ps))
    pooled = s["verifier_pooled"]
    assert pooled["sources"] == ["autoregressive", "spec_cascade/spec"]
    assert pooled["quality"] == pytest.approx(
        sacrebleu.corpus_bleu(ar + spec, [_REFS + _REFS]).score)
    assert pooled["quality_ci"][0] < pooled["quality"] < pooled["quality_ci"][1]
    assert s["paired_test"] == "paired bootstrap"
    md = to_markdown(s)
    assert "paired bootstrap over segments" in md and "| `drafter_only` | 0.00 |" in md
    plain = summarize(rows, task, bootstrap=0)  # the point figures do not depend on the CIs
    assert "vs_verifier" not in plain["configs"][1]
    assert plain["verifier_pooled"]["quality"] == pooled["quality"]
    assert plain["verifier_pooled"]["quality_ci"] is None


def test_wmt14_task_excludes_exemplars():
    _need_data("wmt", "wmt14", "newstest2014.en")
    task = get_task("wmt14", n_boot=50)
    examples = task.examples()
    assert len(examples) == 3003 - task.k
    shot_ids = {f"newstest2014-{i + 1}" for i in task._shot_idx}
    assert not shot_ids & {e.id for e in examples}
    ex = examples[0]
    prompt = task.build_prompt(ex)
    assert prompt.endswith(f"English: {ex.data['source']}\nGerman:")
    assert prompt.count("German:") == task.k + 1
    assert task.postprocess(ex, " Hallo Welt.\nEnglish: more") == "Hallo Welt."
    rows = [task.score(e, e.data["reference"]) for e in examples[:5]]
    q, se = task.aggregate(rows)
    assert q == pytest.approx(100.0) and se == pytest.approx(0.0, abs=1e-6)


def test_chat_prompts_use_the_template():
    from speccascade_fast.eval.harness import default_chat

    tok = byte_tokenizer()
    assert not default_chat(tok, [])
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    model = argparse.Namespace(name_or_path="org/Some-Model-1.5B-Instruct")
    assert default_chat(tok, [model]) and not default_chat(tok, [object()])
    ex = Example("x", {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4",
                       "prompt": "def f():\n", "source": "Hello.", "reference": "Hallo."})
    he = get_task("humaneval").build_prompt(ex, chat=True, tokenizer=tok)
    assert he.startswith("<user>Complete") and he.endswith("<assistant>")
    if data_root().joinpath("gsm8k", "train.jsonl").exists():
        g = get_task("gsm8k", k=2).build_prompt(ex, chat=True, tokenizer=tok)
        assert g.count("<user>") == 3 and g.count("<assistant>") == 3
        assert "<user>What is 2 + 2?\n<assistant>" in g
    if data_root().joinpath("wmt", "wmt14", "newstest2014.en").exists():
        w = get_task("wmt14", k=2).build_prompt(ex, chat=True, tokenizer=tok)
        assert w.count("<user>") == 3 and w.endswith("<user>Hello.\n<assistant>")


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_subcommand_parses(tmp_path):
    assert parse_alphas(["0", "0.1,0.2"]) == [0.0, 0.1, 0.2]
    assert parse_alphas(["token_v3=0,0.3", "0.5"]) == {"token_v3": [0.0, 0.3], "*": [0.5]}
    parser = argparse.ArgumentParser(prog="speccascade")
    add_eval_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "eval", "--task", "gsm8k", "--methods", "spec_cascade", "seq_cascade",
        "--rules", "token_v3", "lossy", "--alphas", "token_v3=0,0.3", "lossy=0.5",
        "seq_cascade=0.4", "--config", "spec_cascade:opt:-1", "--limit", "3", "--out",
        str(tmp_path), "--seq-score", "mean_logprob"])
    assert callable(args.func) and args.limit == 3 and args.seq_score == "mean_logprob"
    keys = [c.key for c in build_configs(args)]
    assert keys == ["autoregressive", "drafter_only", "spec_cascade/token_v3/alpha=0.0",
                    "spec_cascade/token_v3/alpha=0.3", "spec_cascade/lossy/alpha=0.5",
                    "seq_cascade/alpha=0.4", "spec_cascade/opt/alpha=-1.0"]


def test_cli_summary_only(tmp_path, capsys):
    """``--summary-only`` rebuilds the summary of a folder without loading models."""
    _need_data("gsm8k", "test.jsonl")
    run_eval("gsm8k", ["autoregressive", "drafter_only", "spec_cascade:token_v3:0.3"],
             drafter=object(), verifier=object(), tokenizer=byte_tokenizer(), limit=2, seed=0,
             out_dir=tmp_path, max_new_tokens=4, progress=False, chat=False,
             generate_fn=fake_generate, warmup=False, plots=False)
    (tmp_path / "summary.json").unlink()
    assert main(["--task", "gsm8k", "--methods", "spec_cascade", "--alphas", "0.3", "--out",
                 str(tmp_path), "--summary-only", "--no-plots"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_examples"] == 2 and len(s["configs"]) == 3 and s["missing_configs"] == []
    assert "spec_cascade/token_v3/alpha=0.3" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--task", "gsm8k", "--samples", "0"], "--samples"),
    (["--task", "wmt14", "--samples", "3"], "argument --samples: wmt14 has a corpus-level metric"),
])
def test_cli_samples_checked_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    from speccascade_fast import models

    monkeypatch.setattr(models, "load_pair", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
