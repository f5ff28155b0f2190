"""Calibrating α for a quality target (speccascade_fast.eval.calibrate, speccascade_fast.calibration):
the bound and the selection on synthetic per-example scores, the split, the calibration file and
every malformed-file error, the file accepted by DecodeConfig / generate / Engine / the CLI, and
an end-to-end calibration and validation on tiny random models (API and CLI). CPU, seconds."""
from __future__ import annotations

import argparse
import json
import math
from statistics import NormalDist

import pytest
import torch

from speccascade_fast import DecodeConfig, Engine, cli, generate
from speccascade_fast.calibration import (
    FORMAT,
    VERSION,
    load_calibration,
    parse_calibration,
    write_calibration,
)
from speccascade_fast.eval import EvalConfig, Example, calibrate, calibrate_cli, validate
from speccascade_fast.eval.calibrate import (
    DEFAULT_ALPHAS,
    cost_per_token,
    ids_sha,
    level_for,
    order_alphas,
    paired_bound,
    select,
    split_ids,
)
from speccascade_fast.eval.grids import TOKEN_V3
from speccascade_fast.eval.tasks import TASKS
from speccascade_fast.rules import ALPHA_RANGES

from .eval_helpers import ToyTask, byte_tokenizer, tiny_llama
from .helpers import left_padded, tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# the bound


def test_normal_bound_is_one_sided_at_c_for_real_valued_scores():
    base = [0.5, 0.2, 0.9, 0.4, 0.7, 0.1, 0.3, 0.8]
    scores = [0.45, 0.25, 0.8, 0.4, 0.6, 0.15, 0.2, 0.85]
    d = [s - b for s, b in zip(scores, base)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    got = paired_bound(scores, base, 0.95)
    assert got == pytest.approx(mean - 1.6448536269514722 * se)  # z of one side at 95 %
    lo, hi = paired_bound(scores, base, 0.95, side="two")
    assert lo == pytest.approx(mean - 1.959963984540054 * se) and hi > mean
    assert lo < got < mean  # one-sided at c is tighter than the two-sided interval at c
    assert paired_bound(scores, base, 0.5) == pytest.approx(mean)  # z = 0 at c = 1/2
    assert paired_bound(scores, base, 0.99) < paired_bound(scores, base, 0.9)


def test_normal_bound_for_pass_fail_scores_is_agresti_min():
    """Half an example per cell of the 2x2 table: no discordant pair still bounds below 0."""
    n = 40
    same = [1.0] * 30 + [0.0] * 10
    lb = paired_bound(same, same, 0.9)
    p = 0.5 / (n + 2)
    assert lb == pytest.approx(-NormalDist().inv_cdf(0.9) * math.sqrt(2 * p / (n + 2)))
    assert -0.05 < lb < 0
    # 3 better, 7 worse
    base = [1.0] * 7 + [0.0] * 3 + [1.0] * 30
    scores = [0.0] * 7 + [1.0] * 3 + [1.0] * 30
    p12, p21 = 3.5 / 42, 7.5 / 42
    se = math.sqrt(((p12 + p21) - (p12 - p21) ** 2) / 42)
    assert paired_bound(scores, base, 0.8) == pytest.approx(
        (p12 - p21) - NormalDist().inv_cdf(0.8) * se)


def test_bootstrap_bound_is_the_lower_quantile_and_seeded():
    base = [1.0] * 50
    scores = [1.0] * 45 + [0.0] * 5
    a = paired_bound(scores, base, 0.9, method="bootstrap", seed=3)
    assert a == paired_bound(scores, base, 0.9, method="bootstrap", seed=3)
    assert -0.2 < a < -0.1 + 1e-9  # mean -0.1; the 10 % quantile of resampled means is lower
    assert paired_bound(base, base, 0.9, method="bootstrap") == 0.0
    lo, hi = paired_bound(scores, base, 0.9, method="bootstrap", side="two")
    assert lo < a < hi
    with pytest.raises(ValueError, match="bound must be one of"):
        paired_bound(scores, base, 0.9, method="exact")
    with pytest.raises(ValueError, match="confidence must be in"):
        paired_bound(scores, base, 1.0)
    with pytest.raises(ValueError, match="paired scores"):
        paired_bound(scores, base[:3], 0.9)


# ---------------------------------------------------------------------------------------------
# the selection on synthetic per-example scores


def _entries(score_lists, base, costs, c=0.9, multiplicity="fixed_sequence"):
    level = level_for(c, multiplicity, len(score_lists))
    return [{"alpha": float(k), "lower_bound": paired_bound(s, base, level),
             "cost_per_token": cost} for k, (s, cost) in enumerate(zip(score_lists, costs))]


BASE = [1.0] * 150 + [0.0] * 50  # the verifier passes 75 % of 200 examples


def _worse(k):
    """The verifier's scores with k passes turned into failures."""
    return [0.0] * k + BASE[k:]


def test_a_setting_clearly_within_the_target_is_chosen_one_clearly_beyond_is_not():
    # α0: no loss, expensive; α1: 1 loss (0.5 points), cheaper; α2: 40 losses (20 points)
    table = _entries([BASE, _worse(1), _worse(40)], BASE, [0.5, 0.4, 0.2])
    assert select(table, 0.05, "fixed_sequence") == 1
    assert [e["qualifies"] for e in table] == [True, True, False]
    assert [e["chosen"] for e in table] == [False, True, False]
    assert table[2]["lower_bound"] < -0.05 <= table[1]["lower_bound"]


def test_fixed_sequence_stops_at_the_first_failure_none_does_not():
    # the cheapest setting is fine, but one before it fails: a fixed sequence never reaches it
    lists, costs = [BASE, _worse(40), BASE], [0.5, 0.3, 0.1]
    fixed = _entries(lists, BASE, costs)
    assert select(fixed, 0.05, "fixed_sequence") == 0
    assert [e["tested"] for e in fixed] == [True, True, False]
    free = _entries(lists, BASE, costs, multiplicity="none")
    assert select(free, 0.05, "none") == 2


def test_no_qualifier_and_ties_fall_back_to_the_lossless_end():
    table = _entries([_worse(30), _worse(40)], BASE, [0.4, 0.3])
    assert select(table, 0.05, "fixed_sequence") is None
    assert not any(e["chosen"] for e in table)
    # equal costs: the one nearer the lossless end
    tie = _entries([BASE, BASE], BASE, [0.3, 0.3])
    assert select(tie, 0.05, "fixed_sequence") == 0
    # lossless spec measured and no cheaper: the fallback
    assert select(_entries([BASE], BASE, [0.3]), 0.05, "fixed_sequence",
                  lossless_cost=0.3) is None
    assert select(_entries([BASE], BASE, [0.29]), 0.05, "fixed_sequence",
                  lossless_cost=0.3) == 0
    # a setting without a measured cost is never chosen
    assert select(_entries([BASE], BASE, [None]), 0.05, "fixed_sequence") is None


def test_bonferroni_tests_each_setting_at_a_stricter_level():
    assert level_for(0.9, "bonferroni", 4) == pytest.approx(0.975)
    assert level_for(0.9, "fixed_sequence", 4) == level_for(0.9, "none", 4) == 0.9
    # a bound that passes at 0.9 but not at 0.975
    lists = [_worse(4)]
    assert select(_entries(lists, BASE, [0.2]), 0.04, "fixed_sequence") == 0
    assert select(_entries(lists * 4, BASE, [0.2] * 4, multiplicity="bonferroni"), 0.04,
                  "bonferroni") is None
    with pytest.raises(ValueError, match="multiplicity"):
        select([], 0.1, "holm")


def test_cost_per_token_from_row_statistics():
    rows = [{"stats": {"verifier_calls": 3, "drafter_calls": 10, "tokens": 12}},
            {"stats": {"verifier_calls": 1, "drafter_calls": 5, "tokens": 8}}]
    assert cost_per_token(rows) == pytest.approx(4 / 20)
    assert cost_per_token(rows, drafter_cost=0.1) == pytest.approx((4 + 1.5) / 20)
    assert cost_per_token([{"stats": {"tokens": 3}}]) is None


def test_alpha_grids_run_from_the_lossless_end():
    assert order_alphas("token_v3", [0.5, 0.1, 0.3, 0.1]) == [0.1, 0.3, 0.5]
    assert order_alphas("ensemble", [0.3, 1.0, 0.7]) == [1.0, 0.7, 0.3]
    assert set(DEFAULT_ALPHAS) == {r for r, rng in ALPHA_RANGES.items() if rng is not None}
    assert DEFAULT_ALPHAS["token_v3"] == TOKEN_V3  # the registered grid's curve
    for rule, grid in DEFAULT_ALPHAS.items():
        assert order_alphas(rule, grid) == list(grid), rule
    with pytest.raises(ValueError, match="outside the range"):
        order_alphas("lossy", [0.5, 1.0])
    with pytest.raises(ValueError, match="no alpha to calibrate"):
        order_alphas("spec", [0.1])
    with pytest.raises(ValueError, match="not a known rule"):
        order_alphas("nope", [0.1])


# ---------------------------------------------------------------------------------------------
# the split


def test_split_is_deterministic_disjoint_and_complete():
    ids = [f"HumanEval/{i}" for i in range(164)]
    cal, val = split_ids(ids, 0.5, 0)
    assert (cal, val) == split_ids(ids, 0.5, 0)
    assert len(cal) == 82 and len(val) == 82
    assert not set(cal) & set(val) and set(cal) | set(val) == set(ids)
    assert cal == [i for i in ids if i in set(cal)]  # task order kept
    assert split_ids(list(reversed(ids)), 0.5, 0)[0] == list(reversed(cal))  # ids, not order
    assert split_ids(ids, 0.5, 1)[0] != cal
    assert cal != ids[:82]  # not the first half
    assert len(split_ids(ids, 0.25, 0)[0]) == 41
    assert split_ids(["a", "b"], 0.01, 0)[0] and split_ids(["a", "b"], 0.99, 0)[1]
    assert ids_sha(cal) != ids_sha(val)
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="calib_fraction"):
            split_ids(ids, bad, 0)
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_ids(["a"], 0.5, 0)
    with pytest.raises(ValueError, match="not unique"):
        split_ids(["a", "a"], 0.5, 0)


# ---------------------------------------------------------------------------------------------
# the file


def _doc(**over):
    d = {"format": FORMAT, "version": VERSION, "knob": "alpha", "method": "spec_cascade",
         "rule": "token_v3", "alpha": 0.3, "fallback": False, "target_drop": 0.05,
         "confidence": 0.9, "task": "humaneval", "n": 82, "split": {"fraction": 0.5},
         "table": [], "settings": {}, "models": {}}
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


def test_file_round_trip(tmp_path):
    cal = write_calibration(tmp_path / "c.json", _doc())
    assert (cal.rule, cal.alpha, cal.knob, cal.value) == ("token_v3", 0.3, "alpha", 0.3)
    assert cal.decode_fields() == {"method": "spec_cascade", "rule": "token_v3", "alpha": 0.3}
    again = load_calibration(tmp_path / "c.json")
    assert again == cal and again.data["target_drop"] == 0.05
    spec = write_calibration(tmp_path / "s.json", _doc(rule="spec", alpha=None, fallback=True))
    assert spec.fallback and spec.decode_fields()["rule"] == "spec" and spec.alpha is None
    budget = parse_calibration(_doc(knob="divergence_budget", divergence_budget=0.5))
    assert budget.decode_fields() == {"method": "spec_cascade", "rule": "token_v3",
                                      "alpha": 0.3, "divergence_budget": 0.5}


@pytest.mark.parametrize("doc, field, message", [
    ([1, 2], None, "must hold a JSON object"),
    (_doc(format="other"), "format", "must be 'speccascade-calibration'"),
    (_doc(format=_DROP), "format", "must be"),
    (_doc(version=2), "version", "reads version 1"),
    (_doc(version=True), "version", "reads version 1"),
    (_doc(knob="temperature"), "knob", "must be one of 'alpha', 'divergence_budget'"),
    (_doc(knob=_DROP), "knob", "must be one of"),
    (_doc(method="token_cascade"), "method", "sets spec_cascade's rule"),
    (_doc(rule="token_v9"), "rule", "'token_v9' is not a known rule"),
    (_doc(rule=_DROP), "rule", "None is not a known rule"),
    (_doc(alpha=_DROP), "alpha", "missing"),
    (_doc(alpha=None), "alpha", "null, but rule 'token_v3' needs an alpha"),
    (_doc(alpha="0.3"), "alpha", "must be a finite number or null"),
    (_doc(alpha=float("nan")), "alpha", "must be a finite number or null"),
    (_doc(rule="lossy", alpha=1.0), "alpha", "outside the range [0, 1) of rule 'lossy'"),
    (_doc(divergence_budget=0.5), "divergence_budget", "absent or null when the knob is"),
    (_doc(knob="divergence_budget"), "divergence_budget", "missing"),
    (_doc(knob="divergence_budget", divergence_budget=-1), "divergence_budget", ">= 0"),
    (_doc(target_drop=-0.1), "target_drop", "a finite number >= 0"),
    (_doc(confidence=1.0), "confidence", "a number in (0, 1)"),
    (_doc(fallback="no"), "fallback", "true or false"),
    (_doc(n=-1), "n", "an int >= 0"),
    (_doc(task=3), "task", "a task name"),
    (_doc(split=[]), "split", "an object"),
    (_doc(table={}), "table", "a list"),
])
def test_every_malformed_file_is_a_value_error_naming_file_and_field(tmp_path, doc, field,
                                                                      message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as e:
        load_calibration(path)
    text = str(e.value)
    assert text.startswith(f"calibration file {path}: ")
    if field is not None:
        assert f"field {field!r}: " in text
    assert message in text


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"calibration file .*nope\.json: not found"):
        load_calibration(tmp_path / "nope.json")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.json: not JSON"):
        load_calibration(tmp_path / "t.json")
    with pytest.raises(ValueError, match="calibration must be a calibration file's path"):
        load_calibration(3)
    with pytest.raises(ValueError, match="field 'alpha'"):
        write_calibration(tmp_path / "w.json", _doc(alpha=None))
    assert not (tmp_path / "w.json").exists()


# ---------------------------------------------------------------------------------------------
# DecodeConfig, generate, Engine and the CLI take the file


@pytest.fixture
def cal_file(tmp_path):
    path = tmp_path / "cal.json"
    write_calibration(path, _doc(alpha=0.6))
    return path


def test_hf_drop_in_takes_the_file(cal_file):
    from speccascade_fast import hf

    drafter, verifier = tiny_pair()
    ids, mask = left_padded([[3, 5, 7], [1, 2, 9, 4]])
    kw = dict(attention_mask=mask, assistant_model=drafter, do_sample=True, temperature=1.0,
              max_new_tokens=8, num_assistant_tokens=3, seed=4, return_dict_in_generate=True)
    want = hf.generate(verifier, ids, deferral_rule="token_v3", lenience=0.6, **kw)
    got = hf.generate(verifier, ids, calibration=cal_file, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert got.stats["rule"] == "token_v3" and got.stats["alpha"] == 0.6
    with pytest.raises(ValueError, match="alpha and calibration are alternatives"):
        hf.generate(verifier, ids, calibration=cal_file, lenience=0.3, **kw)


def test_decode_config_takes_the_file_in_place_of_rule_and_alpha(cal_file, tmp_path):
    cfg = DecodeConfig(calibration=cal_file, gamma=3)
    assert (cfg.method, cfg.rule, cfg.alpha, cfg.gamma) == ("spec_cascade", "token_v3", 0.6, 3)
    assert DecodeConfig(calibration=str(cal_file), rule="token_v3").alpha == 0.6
    assert DecodeConfig(calibration=load_calibration(cal_file)).alpha == 0.6
    with pytest.raises(ValueError, match=r"alpha and calibration are alternatives: alpha=0\.3"):
        DecodeConfig(calibration=cal_file, alpha=0.3)
    with pytest.raises(ValueError, match="rule and calibration disagree: rule='lossy'"):
        DecodeConfig(calibration=cal_file, rule="lossy")
    with pytest.raises(ValueError, match="method and calibration disagree"):
        DecodeConfig(calibration=cal_file, method="autoregressive")
    with pytest.raises(ValueError, match=r"calibration file .*: field 'rule'"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(_doc(rule="nope")))
        DecodeConfig(calibration=bad)
    spec = tmp_path / "spec.json"
    write_calibration(spec, _doc(rule="spec", alpha=None, fallback=True))
    cfg = DecodeConfig(calibration=spec)
    assert (cfg.rule, cfg.alpha) == ("spec", None)


def test_a_budget_calibration_needs_the_budget_setting(tmp_path):
    path = tmp_path / "b.json"
    write_calibration(path, _doc(knob="divergence_budget", divergence_budget=0.25))
    fields = {f.name for f in __import__("dataclasses").fields(DecodeConfig)}
    if "divergence_budget" in fields:
        cfg = DecodeConfig(calibration=path)
        assert (cfg.rule, cfg.alpha, cfg.divergence_budget) == ("token_v3", 0.3, 0.25)
        with pytest.raises(ValueError, match="divergence_budget and calibration are "
                                             "alternatives"):
            DecodeConfig(calibration=path, divergence_budget=0.1)
    else:
        with pytest.raises(ValueError, match="field 'knob'"):
            DecodeConfig(calibration=path)


def test_generate_and_engine_take_the_file(cal_file):
    drafter, verifier = tiny_pair()
    ids, mask = left_padded([[3, 5, 7], [1, 2, 9, 4]])
    kw = dict(max_new_tokens=10, seed=[4, 5], temperature=1.0, gamma=3)
    want = generate(drafter, verifier, ids, attention_mask=mask, rule="token_v3", alpha=0.6,
                    **kw)
    got = generate(drafter, verifier, ids, attention_mask=mask, calibration=cal_file, **kw)
    assert got.new_tokens == want.new_tokens
    assert got.stats["rule"] == "token_v3" and got.stats["alpha"] == 0.6
    with pytest.raises(ValueError, match="alpha and calibration are alternatives"):
        generate(drafter, verifier, ids, attention_mask=mask, calibration=cal_file, alpha=0.6,
                 **kw)
    eng = Engine(drafter, verifier, max_batch_size=2, max_seq_len=64, calibration=cal_file,
                 gamma=3)
    assert (eng.cfg.rule, eng.cfg.alpha) == ("token_v3", 0.6)
    out = eng.generate(ids, mask, max_new_tokens=10, seed=[4, 5])
    assert out.new_tokens == want.new_tokens
    with pytest.raises(ValueError, match="alpha and calibration are alternatives"):
        Engine(drafter, verifier, calibration=cal_file, alpha=0.2)
    with pytest.raises(ValueError, match="either as config= or as keyword"):
        Engine(drafter, verifier, calibration=cal_file, config=DecodeConfig())


def _error_line(capsys, argv) -> str:
    assert cli.main(list(argv)) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("speccascade: error: "), cap.err
    return lines[0]


def test_cli_generate_errors_name_the_file_and_field(no_loading, capsys, cal_file, tmp_path):
    line = _error_line(capsys, ["generate", "x", "--calibration", str(cal_file), "--alpha",
                                "0.3"])
    assert "argument --alpha: alpha and calibration are alternatives" in line
    assert str(cal_file) in line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc(rule="token_v9")))
    line = _error_line(capsys, ["generate", "x", "--calibration", str(bad)])
    assert line.startswith(f"speccascade: error: argument --calibration: calibration file "
                           f"{bad}: field 'rule': 'token_v9' is not a known rule")
    line = _error_line(capsys, ["generate", "x", "--calibration", str(tmp_path / "no.json")])
    assert "no.json: not found" in line


WORDS = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(45)]


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """A tiny random pair saved as Hugging Face folders with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<pad>")
    root = tmp_path_factory.mktemp("cal_models")
    out = []
    for name, model in zip(("drafter", "verifier"), tiny_pair(V=len(WORDS), seed=7)):
        model.config.eos_token_id = model.generation_config.eos_token_id = 2
        model.config.pad_token_id = model.generation_config.pad_token_id = 0
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        out.append(str(root / name))
    return out


def test_cli_generate_with_the_file_decodes_as_its_rule_and_alpha(model_folders, capsys,
                                                                   cal_file):
    d, v = model_folders
    base = ["generate", "w1 w2 w3", "--drafter", d, "--verifier", v, "--dtype", "float32",
            "--device", "cpu", "--quiet", "--max-new-tokens", "12", "--temperature", "1",
            "--seed", "3", "--json"]
    assert cli.main(base + ["--rule", "token_v3", "--alpha", "0.6"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert cli.main(base + ["--calibration", str(cal_file)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["new_tokens"] == want["new_tokens"]
    assert (got["stats"]["rule"], got["stats"]["alpha"]) == ("token_v3", 0.6)


def test_cli_generate_uses_the_file(monkeypatch, capsys, cal_file):
    """The calibrated rule and alpha reach generate (the model loading is stubbed)."""
    seen = {}

    def fake_generate(*a, **kw):
        seen.update(kw)
        return argparse.Namespace(new_tokens=[[1, 2]], stats={"tokens": 2})

    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": torch.tensor([[1, 2, 3]])}

        def decode(self, ids, **kw):
            return "ok"

    monkeypatch.setattr(cli, "_load", lambda *a, **kw: (object(), object(), Tok()))
    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["generate", "x", "--calibration", str(cal_file), "--json"]) == 0
    assert (seen["rule"], seen["alpha"], seen["method"]) == ("token_v3", 0.6, "spec_cascade")
    assert json.loads(capsys.readouterr().out)["completion"] == "ok"


# ---------------------------------------------------------------------------------------------
# end to end: a fake engine with controlled quality, then tiny random models


class TwentyTask(ToyTask):
    """Twenty prompts; the score is 1 when the output contains an 'a'."""

    def examples(self, limit=None):
        return [Example(f"toy-{i}", {"q": f"q{i}"}) for i in range(20)][:limit]


def quality_fake(drafter, verifier, input_ids, *, method="spec_cascade", rule=None, alpha=None,
                 max_new_tokens=8, seed=0, **kw):
    """The verifier, spec and α <= 0.3 or α = 0.9 write 'a' (score 1), α = 0.7 'b' (score 0);
    cost: one verifier call per token alone, fewer as α grows."""
    tok = byte_tokenizer()
    seeds = [seed] if isinstance(seed, int) else list(seed)
    good = alpha is None or alpha <= 0.3 or alpha >= 0.9  # the verifier, spec and those α
    t = tok.convert_tokens_to_ids("a" if good else "b")
    n = max_new_tokens
    calls = n if method == "autoregressive" else max(1, round(n * (1 - (alpha or 0)) / 2))
    per = [{"tokens": n, "verifier_calls": calls, "drafter_calls": 0 if alpha is None else n,
            "drafted": n, "accepted": n - 1, "rejected": 1, "deferred": 1} for _ in seeds]
    stats = {k: sum(p[k] for p in per) for k in per[0]}
    if len(seeds) > 1:
        stats["per_sequence"] = per
    new = [[t] * n for _ in seeds]
    return argparse.Namespace(sequences=torch.cat([input_ids.cpu(), torch.tensor(new)], 1),
                              stats=stats, new_tokens=new)


def _fake_run(tmp_path, **kw):
    args = dict(drafter=object(), verifier=object(), tokenizer=byte_tokenizer(),
                out_dir=tmp_path, target_drop=0.2, confidence=0.9,
                alphas=[0.1, 0.3, 0.7, 0.9], batch_size=4, max_new_tokens=6, progress=False,
                chat=False, generate_fn=quality_fake)
    args.update(kw)
    return calibrate(TwentyTask(), **args)


def test_calibrate_end_to_end_with_controlled_quality(tmp_path):
    doc = _fake_run(tmp_path)
    assert (doc["rule"], doc["alpha"], doc["fallback"]) == ("token_v3", 0.3, False)
    t = {e["alpha"]: e for e in doc["table"]}
    assert t[0.7]["diff"] == -1.0 and not t[0.7]["qualifies"] and t[0.9]["tested"] is False
    assert t[0.3]["cost_ratio"] < t[0.1]["cost_ratio"] < 1
    assert doc["n"] == 10 and doc["split"]["n_validation"] == 10
    assert doc["plan"]["configs"][0] == "autoregressive"
    assert doc["models"] == {"drafter": "object", "verifier": "object"}
    cal = load_calibration(tmp_path / "calibration.json")
    assert DecodeConfig(calibration=cal).alpha == 0.3
    assert "**yes**" in (tmp_path / "calibration.md").read_text()
    # the same rows, each alpha on its own: the cheapest good one
    doc = _fake_run(tmp_path, multiplicity="none")
    assert doc["alpha"] == 0.9
    # a stricter target: nothing qualifies, the lossless rule is chosen and the file says so
    doc = _fake_run(tmp_path, target_drop=0.01)
    assert (doc["rule"], doc["alpha"], doc["fallback"]) == ("spec", None, True)
    assert "lossless rule spec" in doc["reason"]
    assert DecodeConfig(calibration=tmp_path / "calibration.json").rule == "spec"
    # another split into the same folder is refused
    with pytest.raises(ValueError, match="another split"):
        _fake_run(tmp_path, split_seed=1)
    v = validate(tmp_path / "calibration.json", drafter=object(), verifier=object(),
                 tokenizer=byte_tokenizer(), progress=False, generate_fn=quality_fake,
                 task=TwentyTask())
    assert v["config"] == "spec_cascade/spec" and v["n"] == 10


def test_validate_reports_the_realised_drop_and_cost_ratio(tmp_path):
    _fake_run(tmp_path)
    v = validate(tmp_path / "calibration.json", drafter=object(), verifier=object(),
                 tokenizer=byte_tokenizer(), progress=False, generate_fn=quality_fake,
                 task=TwentyTask(), out_dir=tmp_path / "v")
    assert v["config"] == "spec_cascade/token_v3/alpha=0.3" and v["n"] == 10
    assert v["calibration_estimate"]["n"] == 10 and v["calibration_estimate"]["diff"] == 0.0
    assert v["diff"] == 0.0 and v["diff_ci"][0] < 0 < v["diff_ci"][1]
    assert v["meets_target"] and v["lower_bound"] >= -0.2
    assert v["cost_ratio"] == pytest.approx(2 / 6) and v["cost_ratio_ci"] == pytest.approx(
        [2 / 6, 2 / 6])
    cal_ids = set(json.loads((tmp_path / "calibration" / "split.json").read_text())
                  ["split"]["calibration_ids_sha256"])
    rows = [json.loads(x) for x in (tmp_path / "v" / "validation" / "rows.jsonl").open()]
    assert {r["example_id"] for r in rows}.isdisjoint(
        {json.loads(x)["example_id"] for x in (tmp_path / "calibration" / "rows.jsonl").open()})
    assert cal_ids and (tmp_path / "v" / "validation.md").exists()
    part = validate(tmp_path / "calibration.json", drafter=object(), verifier=object(),
                    tokenizer=byte_tokenizer(), progress=False, generate_fn=quality_fake,
                    task=TwentyTask(), out_dir=tmp_path / "v3", limit=3)
    assert part["n"] == 3 and part["n_validation_split"] == 10
    with pytest.raises(ValueError, match="limit must be None"):
        validate(tmp_path / "calibration.json", drafter=object(), verifier=object(),
                 tokenizer=byte_tokenizer(), generate_fn=quality_fake, task=TwentyTask(),
                 limit=0)
    other = type("Other", (TwentyTask,), {"name": "other"})
    with pytest.raises(ValueError, match="not the calibration's task"):
        validate(tmp_path / "calibration.json", drafter=object(), verifier=object(),
                 tokenizer=byte_tokenizer(), task=other(), generate_fn=quality_fake)
    with pytest.raises(ValueError, match="field 'split': the task's examples no longer give"):
        validate(tmp_path / "calibration.json", drafter=object(), verifier=object(),
                 tokenizer=byte_tokenizer(), task=ToyTask(), generate_fn=quality_fake)


def test_calibrate_checks_its_arguments_before_writing(tmp_path):
    for kw, match in (({"target_drop": -1}, "target_drop"), ({"confidence": 1}, "confidence"),
                      ({"bound": "exact"}, "bound"), ({"multiplicity": "holm"}, "multiplicity"),
                      ({"alphas": [2.0], "rule": "lossy"}, "outside the range"),
                      ({"calib_fraction": 1.0}, "calib_fraction"),
                      ({"drafter_cost": -1}, "drafter_cost"), ({"gamma": 0}, "gamma"),
                      ({"max_new_tokens": 0}, "max_new_tokens"), ({"batch_size": 0}, "batch_size"),
                      ({"seed": "0"}, "seed"), ({"chat": "yes"}, "chat"),
                      ({"unsafe_local_exec": 1}, "unsafe_local_exec")):
        with pytest.raises(ValueError, match=match):
            _fake_run(tmp_path / "x", **kw)
        assert not (tmp_path / "x").exists()


@pytest.fixture
def tiny():
    tok = byte_tokenizer()
    return tiny_llama(len(tok), 1, seed=1), tiny_llama(len(tok), 2, seed=2), tok


def test_calibrate_and_validate_on_tiny_models_through_the_cli(tiny, tmp_path, monkeypatch,
                                                                capsys):
    """The CLI end to end on tiny random models with the real engine (task and loading
    stubbed): calibration file, validation, then ``generate --calibration``."""
    drafter, verifier, tok = tiny
    monkeypatch.setitem(TASKS, "toy", TwentyTask)
    monkeypatch.setattr(calibrate_cli, "_models", lambda *a: (drafter, verifier, tok))
    out = tmp_path / "cal"
    argv = ["--task", "toy", "--target-drop", "0.5", "--confidence", "0.8", "--alphas",
            "0.5,0.1", "--batch-size", "4", "--max-new-tokens", "6", "--chat", "off",
            "--no-progress", "--out", str(out)]
    assert calibrate_cli.main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "calibration.json").read_text())
    assert [e["alpha"] for e in doc["table"]] == [0.1, 0.5]
    assert doc["plan"]["command"].startswith("speccascade calibrate --task toy")
    assert doc["settings"]["batch_size"] == 4 and doc["settings"]["max_new_tokens"] == 6
    rows = [json.loads(x) for x in (out / "calibration" / "rows.jsonl").open()]
    assert len(rows) == 3 * 10 and all(r["batch_size"] == 4 for r in rows)
    assert all(r["engine"] == "static" for r in rows)  # the batched Engine ran them
    assert '"calibration"' in printed
    # validation of the file, then the file decodes
    assert calibrate_cli.main(["--validate", str(out / "calibration.json"), "--no-progress"]) \
        == 0
    v = json.loads((out / "validation.json").read_text())
    assert v["n"] == 10 and v["config"] in {r["config"] for r in rows} | {"spec_cascade/spec"}
    cfg = DecodeConfig(calibration=out / "calibration.json")
    assert (cfg.rule, cfg.alpha) == (doc["rule"], doc["alpha"])
    # --validate fixes the task and settings
    assert calibrate_cli.main(["--validate", str(out / "calibration.json"), "--task",
                               "toy"]) == 2
    assert "argument --validate: the calibration file fixes" in capsys.readouterr().err


def test_calibrate_cli_errors_before_loading(monkeypatch, capsys, tmp_path):
    def load(*a):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(calibrate_cli, "_models", load)
    monkeypatch.setitem(TASKS, "toy", TwentyTask)
    base = ["calibrate", "--task", "toy", "--out", str(tmp_path / "o")]
    for argv, expected in (
            (base, "the following arguments are required: --target-drop"),
            (base + ["--target-drop", "-0.1"], "argument --target-drop: target_drop must be"),
            (base + ["--target-drop", "0.1", "--confidence", "1"],
             "argument --confidence: confidence must be"),
            (base + ["--target-drop", "0.1", "--alphas", "0.1,x"],
             "argument --alphas: 'x' is not a number"),
            (base + ["--target-drop", "0.1", "--rule", "spec"], "no alpha to calibrate"),
            (base + ["--target-drop", "0.1", "--calib-fraction", "1"],
             "argument --calib-fraction: calib_fraction must be"),
            (["calibrate", "--target-drop", "0.1", "--out", "x"],
             "the following arguments are required: --task"),
            (["calibrate", "--validate", str(tmp_path / "none.json")], "none.json: not found")):
        line = _error_line(capsys, argv)
        assert expected in line, (argv, line)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# the divergence-budget knob


HAS_BUDGET = "divergence_budget" in DecodeConfig.__dataclass_fields__


def test_eval_config_carries_a_divergence_budget():
    c = EvalConfig("spec_cascade", "token_v3", 0.3, divergence_budget=0.25)
    assert c.key == "spec_cascade/token_v3/alpha=0.3/budget=0.25"
    assert EvalConfig.parse(c.key) == c == EvalConfig.parse("spec_cascade:token_v3:0.3:budget=0.25")
    assert c.level == 0.25 and c.curve == "spec_cascade[token_v3,alpha=0.3,budget]"
    assert c.to_dict()["divergence_budget"] == 0.25
    assert c.generate_kwargs()["divergence_budget"] == 0.25
    assert "divergence_budget" not in EvalConfig("spec_cascade", "token_v3", 0.3).to_dict()
    with pytest.raises(ValueError, match="divergence_budget applies to spec_cascade"):
        EvalConfig("autoregressive", divergence_budget=0.1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        EvalConfig("spec_cascade", "token_v3", 0.3, divergence_budget=-1)


def budget_fake(drafter, verifier, input_ids, *, divergence_budget=None, max_new_tokens=8,
                **kw):
    """``quality_fake`` where the budget sets quality and cost: B <= 0.1 writes 'a', larger 'b';
    a larger budget, fewer verifier calls."""
    alpha = None if kw.get("method") == "autoregressive" else (
        0.0 if divergence_budget is None or divergence_budget <= 0.1 else 0.7)
    out = quality_fake(drafter, verifier, input_ids, max_new_tokens=max_new_tokens,
                       **{**kw, "alpha": alpha})
    if divergence_budget is not None:
        calls = max(1, round(max_new_tokens * (1 - min(divergence_budget, 0.9))))
        for p in out.stats.get("per_sequence", [out.stats]):
            p["verifier_calls"] = calls
    return out


@pytest.mark.skipif(not HAS_BUDGET, reason="DecodeConfig has no divergence_budget")
def test_calibrate_a_divergence_budget(tmp_path):
    doc = _fake_run(tmp_path, alphas=None, budgets=[0.5, 0.0, 0.1], alpha=0.4,
                    generate_fn=budget_fake)
    assert [e["value"] for e in doc["table"]] == [0.0, 0.1, 0.5]
    assert (doc["knob"], doc["rule"], doc["alpha"], doc["divergence_budget"]) == (
        "divergence_budget", "token_v3", 0.4, 0.1)
    cfg = DecodeConfig(calibration=tmp_path / "calibration.json")
    assert (cfg.alpha, cfg.divergence_budget) == (0.4, 0.1)
    v = validate(tmp_path / "calibration.json", drafter=object(), verifier=object(),
                 tokenizer=byte_tokenizer(), progress=False, generate_fn=budget_fake,
                 task=TwentyTask())
    assert v["config"] == "spec_cascade/token_v3/alpha=0.4/budget=0.1"
    with pytest.raises(ValueError, match="alphas and budgets are alternatives"):
        _fake_run(tmp_path / "x", budgets=[0.1])
    with pytest.raises(ValueError, match="budgets must be a number >= 0"):
        _fake_run(tmp_path / "x", alphas=None, budgets=[-0.1])
    with pytest.raises(ValueError, match="alpha .* goes with budgets"):
        _fake_run(tmp_path / "x", alpha=0.3)
