"""The vLLM plugin's rejection step against vLLM's own inputs (built with vLLM's classes, no
engine): at T = 0 ``spec`` equals vLLM's rejection sampler; at T = 1 the emitted law is
``target_distribution``'s (chi-squared, 20,000 rows, as tests/test_verify_distribution.py);
each request of a mixed batch is verified as :func:`speccascade_fast.verify` verifies it alone;
seeded requests do not depend on their batch; settings and requests are validated."""
from __future__ import annotations

import pytest
import torch

from . import require_vllm

require_vllm()

import speccascade_fast as sc  # noqa: E402
from speccascade_fast.integrations import vllm as plugin  # noqa: E402

from ..helpers import chi2_pvalue  # noqa: E402
from .vllm_inputs import (  # noqa: E402
    cascade_sampler,
    sampling_metadata,
    spec_metadata,
    use_vllm_cpu_kernels,
    vllm_sampler,
)

P_MIN = 1e-4  # fixed seeds: each test is deterministic; the threshold guards against bad luck
ROWS = 20_000


@pytest.fixture(scope="module", autouse=True)
def vllm_cpu_kernels():
    use_vllm_cpu_kernels()


def greedy_batch(V=64, seed=0, gammas=(3, 0, 2, 1, 4, 0)):
    """Drafter / verifier logits that agree on most argmaxes, greedy drafts (the drafter's
    argmax), and vLLM's flattened rows: ``(drafts per request, q [N, V], logits [N + B, V])``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for gamma in gammas:
        shared = torch.randn(gamma + 1, V, generator=g) * 3
        q = shared + 0.7 * torch.randn(gamma + 1, V, generator=g)
        p = shared + 0.7 * torch.randn(gamma + 1, V, generator=g)
        rows.append((q[:gamma], p))
    drafts = [q.argmax(-1).tolist() for q, _ in rows]
    q = torch.cat([q for q, _ in rows])
    logits = torch.cat([p for _, p in rows])
    return drafts, q, logits


@pytest.mark.parametrize("draft_kind", ["none", "logits"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_spec_equals_vllms_rejection_sampler(draft_kind, seed):
    drafts, q, logits = greedy_batch(seed=seed)
    md = spec_metadata(drafts)
    sm = sampling_metadata([0.0] * len(drafts))
    want = vllm_sampler()(md, None, logits.clone(), sm).sampled_token_ids
    draft = None if draft_kind == "none" else q
    got = cascade_sampler(draft_kind=draft_kind, rule="spec")(md, draft, logits.clone(), sm)
    assert got.sampled_token_ids.dtype == torch.int32
    assert torch.equal(got.sampled_token_ids, want), (got.sampled_token_ids, want)
    n = torch.tensor([len(d) for d in drafts])
    assert bool(((want != -1).sum(1) >= 1).all()) and bool(((want != -1).sum(1) <= n + 1).all())


def test_greedy_spec_with_vllms_logits_processors_equals_vllm():
    """vLLM's logits processors (here its allowed-token mask, which hides some of the verifier's
    argmaxes) change the verifier's rows for the plugin as for vLLM's own sampler."""
    drafts, q, logits = greedy_batch(seed=5)
    B = len(drafts)
    md = spec_metadata(drafts)
    sm = sampling_metadata([0.0] * B)
    mask = torch.zeros(B, 64, dtype=torch.bool)
    mask[:, logits.argmax(-1).unique()[::2]] = True  # half the verifier's argmaxes forbidden
    sm.allowed_token_ids_mask = mask
    want = vllm_sampler()(md, None, logits.clone(), sm).sampled_token_ids
    got = cascade_sampler(draft_kind="logits", rule="spec")(md, q, logits.clone(), sm)
    assert torch.equal(got.sampled_token_ids, want)
    emitted = want[want != -1]
    assert not bool(mask[0, emitted.long()].any())  # no forbidden token emitted


def one_position(V, seed):
    """One position's drafter / verifier logits (partly agreeing) and its bonus row."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(2, V, generator=g) * 1.5
    q = shared + 0.8 * torch.randn(2, V, generator=g)
    p = shared + 0.8 * torch.randn(2, V, generator=g)
    return q, p


def chi2_batch(rule, alpha, draft_kind, T=1.0, V=12, seed=0, top_k=None, top_p=None):
    """ROWS requests with one draft each at the same position: the emitted tokens and the laws
    of the first and the bonus position."""
    q, p = one_position(V, seed)
    qT = sc.probs.scaled(q[:1], torch.tensor([T], dtype=torch.float64), top_k, top_p)[0] \
        if draft_kind == "logits" else torch.softmax(q[0].float() / T, -1).double()
    g = torch.Generator().manual_seed(seed + 1)
    drafts = torch.multinomial(qT, ROWS, replacement=True, generator=g)
    md = spec_metadata([[int(x)] for x in drafts])
    logits = p.repeat(ROWS, 1)  # request b: rows 2b (its draft), 2b + 1 (its bonus)
    if draft_kind == "logits":
        draft = q[:1].repeat(ROWS, 1)
    else:  # vLLM's draft_probs: softmax(logits / T) in float32
        draft = torch.softmax(q[:1].float() / T, -1).repeat(ROWS, 1)
    sm = sampling_metadata([T] * ROWS, top_k=[top_k] * ROWS if top_k else None,
                           top_p=[top_p] * ROWS if top_p else None, vocab=V)
    sampler = cascade_sampler(draft_kind=draft_kind, rule=rule, alpha=alpha)
    torch.manual_seed(seed)  # the unseeded requests' fresh seeds come from the plugin's own RNG
    out = sampler(md, draft, logits, sm).sampled_token_ids
    both = draft_kind == "logits"
    law0 = sc.target_distribution(q[:1], p[:1], rule=rule, alpha=alpha, temperature=T,
                                  top_k=top_k if both else None, top_p=top_p if both else None)
    if not both and (top_k or top_p):  # vLLM's convention: the verifier alone is truncated
        keep = sc.probs.scaled(p[:1], torch.tensor([T], dtype=torch.float64), top_k, top_p) > 0
        law0 = sc.target_distribution(q[:1], p[:1].masked_fill(~keep, float("-inf")), rule=rule,
                                      alpha=alpha, temperature=T)
    bonus_law = sc.probs.scaled(p[1:], torch.tensor([T], dtype=torch.float64), top_k, top_p)
    return out, law0[0], bonus_law[0], sampler


@pytest.mark.parametrize("draft_kind", ["logits", "probs"])
@pytest.mark.parametrize("rule,alpha", [("spec", None), ("token_v3", 0.4), ("opt", 0.5)])
def test_emitted_law_at_T1(rule, alpha, draft_kind):
    out, law, bonus_law, sampler = chi2_batch(rule, alpha, draft_kind)
    assert chi2_pvalue(out[:, 0].long(), law) > P_MIN
    full = out[:, 1] != -1  # the draft was accepted: vLLM's bonus token, the verifier's law
    assert int(full.sum()) > 1000
    assert chi2_pvalue(out[full, 1].long(), bonus_law) > P_MIN
    stats = sampler.exporter.as_dict()[rule]
    assert stats["drafted"] == ROWS and stats["accepted"] == int(full.sum())
    assert stats["tokens"] == ROWS + int(full.sum())


@pytest.mark.parametrize("draft_kind", ["logits", "probs"])
def test_emitted_law_with_top_k_and_top_p(draft_kind):
    out, law, bonus_law, _ = chi2_batch("token_v3", 0.3, draft_kind, T=0.8, top_k=8, top_p=0.9)
    assert chi2_pvalue(out[:, 0].long(), law) > P_MIN
    full = out[:, 1] != -1
    assert chi2_pvalue(out[full, 1].long(), bonus_law) > P_MIN


def test_the_law_differs_from_lossless_where_the_rule_says():
    """The chi-squared test has power: token_v3's tokens do not pass as spec's law."""
    out, _, _, _ = chi2_batch("token_v3", 0.9, "logits")
    q, p = one_position(12, 0)
    spec_law = sc.target_distribution(q[:1], p[:1], rule="spec", temperature=1.0)[0]
    assert chi2_pvalue(out[:, 0].long(), spec_law) < 1e-6


def test_vllms_expand_helper_is_never_called(monkeypatch):
    """Temperature, top-k and top-p never reach vLLM's rejection-sampling helpers (the CPU
    build's expand_batch_to_tokens returns uninitialised memory)."""
    from vllm.v1.sample import rejection_sampler as rs

    def broken(*args, **kwargs):
        raise AssertionError("expand_batch_to_tokens called")

    monkeypatch.setattr(rs, "expand_batch_to_tokens", broken)
    monkeypatch.setattr(rs, "apply_sampling_constraints", broken)
    monkeypatch.setattr(rs, "rejection_sample", broken)
    drafts, q, logits = greedy_batch(seed=4)
    B = len(drafts)
    md = spec_metadata(drafts)
    sm = sampling_metadata([1.0, 0.0, 0.7, 1.3, 0.5, 1.0], top_k=[5, None, 10, None, 3, None],
                           top_p=[None, 0.9, None, 0.8, None, None], vocab=64)
    out = cascade_sampler(rule="token_v3")(md, q, logits, sm).sampled_token_ids
    assert out.shape == (B, max(map(len, drafts)) + 1)


def per_request_reference(drafts, q, logits, b, **kw):
    """Request b verified alone by speccascade_fast.verify (bonus='verifier')."""
    n = [len(d) for d in drafts]
    lo = sum(n[:b])
    x = torch.tensor(drafts[b])[None]
    return sc.verify(q[lo:lo + n[b]][None], x, logits[lo + b:lo + b + n[b] + 1][None], **kw)


def test_mixed_batch_equals_each_request_alone():
    """Greedy and sampled requests, per-request top-k / top-p / rule / alpha, requests without
    drafts, in one batch: each request's tokens are verify's for it alone (its bonus token
    replaced by vLLM's where every draft was accepted)."""
    drafts, q, logits = greedy_batch(seed=7, gammas=(3, 0, 2, 4, 1, 3, 0, 2))
    B = len(drafts)
    T = [0.0, 1.0, 0.8, 1.0, 0.0, 1.2, 0.5, 1.0]
    top_k = [None, None, 7, None, None, 7, None, None]
    top_p = [None, 0.9, None, 0.85, None, None, None, None]
    rules = ["spec", "token_v3", "token_v3", "opt", "chow", "token_v3", "spec", "lossy"]
    alphas = [None, 0.3, 0.3, 0.5, 0.2, 0.6, None, 0.2]
    seeds = torch.arange(B, dtype=torch.int64) * 7 + 1
    positions = torch.arange(B, dtype=torch.int64) * 11 + 5
    md = spec_metadata(drafts)
    sm = sampling_metadata(T, top_k=top_k, top_p=top_p, vocab=64)
    bonus = torch.arange(B, dtype=torch.int32) + 100  # stand-ins for vLLM's bonus tokens
    out, stats = plugin.verify_batch(
        draft=q, draft_kind="logits", draft_token_ids=md.draft_token_ids,
        num_draft_tokens=md.num_draft_tokens, logits=logits, bonus_token_ids=bonus,
        temperature=sm.temperature, top_k=sm.top_k, top_p=sm.top_p, rules=rules, alphas=alphas,
        seeds=seeds, positions=positions, max_spec_len=md.max_spec_len)
    assert out.shape == (B, 5)
    for b in range(B):
        n = len(drafts[b])
        if n == 0:
            assert out[b].tolist() == [int(bonus[b])] + [-1] * 4
            continue
        ref = per_request_reference(
            drafts, q, logits, b, rule=rules[b], alpha=alphas[b],
            temperature=float(sm.temperature[b]), top_k=top_k[b],
            top_p=None if top_p[b] is None else float(sm.top_p[b]), seed=int(seeds[b]),
            positions=positions[b:b + 1])
        a = int(ref.num_accepted[0])
        want = ref.tokens[0, :a + 1].tolist()
        if a == n:
            want[-1] = int(bonus[b])
        assert out[b].tolist() == want + [-1] * (4 - a), (b, out[b], ref.tokens)
    assert set(stats) == set(rules)
    assert sum(s.tokens for s in stats.values()) == int((out != -1).sum())


def test_seeded_request_same_alone_or_batched():
    """A request with its own seed (vLLM's generator) emits the same tokens alone and batched:
    the verification's randomness is keyed by the seed, vLLM's bonus draw by its generator."""
    drafts, q, logits = greedy_batch(seed=3, gammas=(2, 3, 1))
    sampler = cascade_sampler(rule="token_v3", alpha=0.3)
    got = set()
    for _ in range(2):
        sm = sampling_metadata([1.0, 1.0, 1.0], seeds={1: 1234})
        got.add(tuple(sampler(spec_metadata(drafts), q, logits, sm).sampled_token_ids[1].tolist()))
    alone = sampler(spec_metadata([drafts[1]]), q[2:5], logits[3:7],
                    sampling_metadata([1.0], seeds={0: 1234})).sampled_token_ids[0]
    assert got == {tuple(alone.tolist())}
    unseeded = {tuple(sampler(spec_metadata(drafts), q, logits, sampling_metadata(
        [1.0] * 3)).sampled_token_ids[1].tolist()) for _ in range(20)}
    assert len(unseeded) > 1  # without a seed: fresh randomness each step


def test_drafter_probabilities_as_logits_keep_both_laws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    T = torch.tensor([0.7, 1.0, 0.0, 1.6], dtype=torch.float64)
    t = torch.where(T > 0, T, torch.ones_like(T)).float()
    probs = torch.softmax(logits / t[:, None], -1)  # vLLM's draft_probs (T = 1 for greedy rows)
    back = plugin.drafter_logits_from_probs(probs, T)
    assert torch.allclose(torch.softmax(back / t[:, None], -1), probs, atol=1e-6)
    assert torch.allclose(torch.softmax(back, -1), torch.softmax(logits, -1), atol=1e-5)
    assert torch.equal(back.argmax(-1), logits.argmax(-1))


def test_draws_follow_each_requests_qT():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 40, generator=g)
    T = torch.tensor([0.0, 1.0, 0.7, 1.0])
    top_k = torch.tensor([40, 5, 40, 40], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.8, 1.0])
    seeds, pos = torch.tensor([1, 2, 3, 4]), torch.tensor([10, 20, 30, 40])
    got = plugin.draw_drafts(logits, T, top_k, top_p, seeds, pos)
    assert int(got[0]) == int(logits[0].argmax())
    for b, (k, p) in enumerate([(None, None), (5, None), (None, float(top_p[2])), (None, None)]):
        want = sc.sample(logits[b:b + 1], temperature=float(T[b]), top_k=k, top_p=p,
                         seed=int(seeds[b]), positions=pos[b:b + 1])
        assert int(got[b]) == int(want[0])


# --- settings and requests -----------------------------------------------------------------------
def test_disabled_unless_asked():
    assert plugin.server_settings({}, {}) is None
    assert plugin.server_settings(None, {"SPECCASCADE_VLLM": "0"}) is None
    assert plugin.server_settings({"speccascade": {}}, {"SPECCASCADE_VLLM": "0"}) is None
    s = plugin.server_settings({"speccascade": {}}, {})
    assert (s.rule, s.alpha, s.backend, s.draft) == ("token_v3", 0.3, "auto", "capture")


def test_settings_from_additional_config_over_environment():
    env = {"SPECCASCADE_VLLM": "1", "SPECCASCADE_VLLM_RULE": "opt",
           "SPECCASCADE_VLLM_ALPHA": "0.7", "SPECCASCADE_VLLM_BACKEND": "reference"}
    s = plugin.server_settings(None, env)
    assert (s.rule, s.alpha, s.backend) == ("opt", 0.7, "reference")
    s = plugin.server_settings({"speccascade": {"rule": "chow", "alpha": 0.1}}, env)
    assert (s.rule, s.alpha, s.backend) == ("chow", 0.1, "reference")


@pytest.mark.parametrize("config,env,names", [
    ({"speccascade": {"rule": "nope"}}, {}, "speccascade.rule"),
    ({"speccascade": {"alpha": 2.0, "rule": "chow"}}, {}, "speccascade.alpha"),
    ({"speccascade": {"alpha": "x"}}, {}, "speccascade.alpha"),
    ({"speccascade": {"gamma": 3}}, {}, "speccascade.gamma"),
    ({"speccascade": {"backend": "tpu"}}, {}, "speccascade.backend"),
    ({"speccascade": {"draft": "maybe"}}, {}, "speccascade.draft"),
    ({"speccascade": "yes"}, {}, "'speccascade' must be an object"),
    (None, {"SPECCASCADE_VLLM": "1", "SPECCASCADE_VLLM_ALPHA": "nan"}, "SPECCASCADE_VLLM_ALPHA"),
    (None, {"SPECCASCADE_VLLM": "1", "SPECCASCADE_VLLM_RULE": "x"}, "SPECCASCADE_VLLM_RULE"),
    (None, {"SPECCASCADE_VLLM": "maybe"}, "SPECCASCADE_VLLM="),
])
def test_bad_settings_name_the_field(config, env, names):
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        plugin.server_settings(config, env)


def test_request_rule_and_alpha():
    server = plugin.Settings(rule="token_v3", alpha=0.5)
    assert plugin.request_rule(None, server) == ("token_v3", 0.5)
    assert plugin.request_rule({"speccascade_alpha": "0.2"}, server) == ("token_v3", 0.2)
    assert plugin.request_rule({"speccascade_rule": "opt"}, server) == ("opt", 0.0)
    assert plugin.request_rule({"speccascade_rule": "spec", "speccascade_alpha": 3},
                               server) == ("spec", None)
    with pytest.raises(ValueError, match="speccascade_rule='tok' is not a known rule"):
        plugin.request_rule({"speccascade_rule": "tok"}, server)
    with pytest.raises(ValueError, match=r"speccascade_alpha: alpha=1\.5 is outside"):
        plugin.request_rule({"speccascade_rule": "chow", "speccascade_alpha": 1.5}, server)
    with pytest.raises(ValueError, match="speccascade_alpha must be a number"):
        plugin.request_rule({"speccascade_alpha": "high"}, server)


def test_front_end_check_names_the_field():
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    spec = SimpleNamespace(method="draft_model", draft_sample_method="greedy")
    config = SimpleNamespace(additional_config={"speccascade": {}}, speculative_config=spec)
    plugin.check_request(SamplingParams(), config)  # nothing asked: nothing checked
    plugin.check_request(SamplingParams(extra_args={"speccascade_rule": "opt"}), config)
    with pytest.raises(VLLMValidationError) as e:
        plugin.check_request(SamplingParams(extra_args={"speccascade_alpha": -3,
                                                        "speccascade_rule": "chow"}), config)
    assert e.value.parameter == "speccascade_alpha"
    with pytest.raises(VLLMValidationError) as e:
        plugin.check_request(SamplingParams(extra_args={"speccascade_rule": "x"}), config)
    assert e.value.parameter == "speccascade_rule"
    off = SimpleNamespace(additional_config={}, speculative_config=spec)
    with pytest.raises(VLLMValidationError, match="plugin is not enabled"):
        plugin.check_request(SamplingParams(extra_args={"speccascade_rule": "spec"}), off)
    vllm_drafts = SimpleNamespace(additional_config={"speccascade": {"draft": "vllm"}},
                                  speculative_config=spec)
    plugin.check_request(SamplingParams(extra_args={"speccascade_rule": "spec"}), vllm_drafts)
    with pytest.raises(VLLMValidationError, match="reads the drafter's distribution"):
        plugin.check_request(SamplingParams(extra_args={"speccascade_rule": "opt"}), vllm_drafts)
    ngram = SimpleNamespace(additional_config={"speccascade": {}},
                            speculative_config=SimpleNamespace(method="ngram"))
    with pytest.raises(VLLMValidationError, match="'ngram' proposer has none"):
        plugin.check_request(SamplingParams(extra_args={"speccascade_rule": "opt"}), ngram)


def test_serve_command(tmp_path, capsys):
    import json
    import sys

    cmd = plugin.serve_command("/m/verifier", "/m/drafter", rule="opt", alpha=0.2,
                               extra=["--port", "8001"])
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/m/verifier"
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec == {"method": "draft_model", "model": "/m/drafter", "num_speculative_tokens": 4}
    extra = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert plugin.server_settings(extra, {}) == plugin.Settings(rule="opt", alpha=0.2)
    assert cmd[-2:] == ["--port", "8001"]
    with pytest.raises(ValueError, match="alpha=1.5 is outside"):
        plugin.serve_command("v", "d", rule="chow", alpha=1.5)
    for name in ("v", "d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    plugin.main(["serve", "--verifier", str(tmp_path / "v"), "--drafter", str(tmp_path / "d"),
                 "--python", "/venv/bin/python", "--print", "--", "--port", "9"])
    printed = capsys.readouterr().out
    assert printed.startswith("/venv/bin/python -m vllm.entrypoints.openai.api_server --model "
                              + str(tmp_path / "v"))
    assert printed.strip().endswith("--port 9")


def test_server_configuration_checked_when_vllm_builds_it():
    from types import SimpleNamespace

    spec = SimpleNamespace(method="draft_model", draft_sample_method="greedy")
    config = lambda extra, **kw: SimpleNamespace(
        additional_config=extra, speculative_config=kw.get("spec", spec),
        use_v2_model_runner=kw.get("v2", False))
    assert plugin.check_config(config({})) is None
    assert plugin.check_config(config({"speccascade": {"rule": "opt"}})).rule == "opt"
    with pytest.raises(ValueError, match="speccascade.alpha: alpha=3.0 is outside"):
        plugin.check_config(config({"speccascade": {"rule": "chow", "alpha": 3}}))
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        plugin.check_config(config({"speccascade": {}}, v2=True))
    with pytest.raises(ValueError, match="server's rule 'token_v3' reads the drafter's"):
        plugin.check_config(config({"speccascade": {"draft": "vllm"}}))
    assert plugin.check_config(config({"speccascade": {"draft": "vllm", "rule": "spec"}}))
    assert plugin.check_config(config({"speccascade": {}}, spec=None)).rule == "token_v3"
