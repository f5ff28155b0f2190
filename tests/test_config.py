"""DecodeConfig: keyword-only, every field validated once, defaults resolved on construction."""
from __future__ import annotations

import dataclasses

import pytest

from speccascade_fast.config import DEFAULT_ALPHA, DEFAULT_SEQ_ALPHA, DecodeConfig


def test_defaults_are_resolved():
    cfg = DecodeConfig()
    assert (cfg.method, cfg.rule, cfg.alpha) == ("spec_cascade", "token_v3", 0.3)
    assert DecodeConfig(rule="chow").alpha == DEFAULT_ALPHA["chow"] == 0.2
    assert DecodeConfig(method="token_cascade").rule == "chow"
    assert DecodeConfig(method="oracle_cascade").rule == "diff"
    seq = DecodeConfig(method="seq_cascade", rule="token_v3")
    assert seq.rule is None and seq.alpha == DEFAULT_SEQ_ALPHA
    ar = DecodeConfig(method="autoregressive", rule="chow")
    assert ar.rule is None and ar.alpha is None  # no rule runs: it is dropped
    assert DecodeConfig(rule="spec").alpha is None
    assert DecodeConfig(temperature=0).temperature == 0.0
    assert isinstance(DecodeConfig(top_p=1).top_p, float)


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        DecodeConfig("spec_cascade")  # positional arguments are refused
    cfg = DecodeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = 3


def test_bonus_step():
    assert DecodeConfig(rule="token_v3").bonus_step
    assert not DecodeConfig(rule="spec").bonus_step
    assert not DecodeConfig(rule="token_v3", bonus="verifier").bonus_step


def test_settings_reported_in_statistics():
    cfg = DecodeConfig(rule="lossy", alpha=0.1, gamma=3, temperature=0.5)
    assert cfg.settings() == dict(method="spec_cascade", rule="lossy", alpha=0.1, gamma=3,
                                  bonus="cascade", temperature=0.5, top_k=None, top_p=None,
                                  min_p=None, draft_confidence=None, exact_prefix=0,
                                  divergence_budget=None)
    sampled = DecodeConfig(method="autoregressive", top_k=40, top_p=0.9, min_p=0.05)
    assert {k: sampled.settings()[k] for k in ("top_k", "top_p", "min_p")} == dict(
        top_k=40, top_p=0.9, min_p=0.05)


@pytest.mark.parametrize("kw,needle", [
    (dict(method="beam"), "method"),
    (dict(gamma=0), "gamma"),
    (dict(gamma=2.0), "gamma"),
    (dict(gamma=True), "gamma"),
    (dict(bonus="drafter"), "bonus"),
    (dict(seq_score="max"), "seq_score"),
    (dict(max_drafter_run=-1), "max_drafter_run"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(rule="nope"), "rule"),
    (dict(rule="chow", alpha=1.5), "alpha"),
    (dict(method="token_cascade", rule="diff"), "token_cascade"),
    (dict(method="oracle_cascade", rule="token_v3"), "prefix rule"),
    (dict(method="seq_cascade", alpha=2.0), "alpha"),
    (dict(method="seq_cascade", alpha=float("nan")), "alpha"),
    (dict(draft_confidence=0.0), "draft_confidence"),
    (dict(draft_confidence=1.0), "draft_confidence"),
    (dict(method="seq_cascade", draft_confidence=0.5), "draft_confidence"),
    (dict(logits_processor=3), "logits_processor"),
    (dict(backend=None), "backend"),
    (dict(method="autoregressive", alpha=0.5), "alpha"),
    (dict(method="drafter_only", rule="nope"), "rule"),
    (dict(exact_prefix=-1), "exact_prefix"),
    (dict(exact_prefix=2, draft_confidence=0.5), "exact_prefix"),
    (dict(gamma_policy="goodput", draft_confidence=0.5), "gamma_policy"),
    (dict(gamma_policy="goodput_confidence", draft_confidence=0.5), "gamma_policy"),
    (dict(gamma_policy="goodput_confidence", method="autoregressive"), "gamma_policy"),
    (dict(gamma_policy="confidence"), "gamma_policy"),
])
def test_bad_values_name_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle):
        DecodeConfig(**kw)
