"""End to end in ``vllm.LLM`` on this CPU: SmolLM2-135M as the verifier, a drafter of the same
vocabulary built by the test (tests/vllm/pair.py), vLLM's draft-model speculation with the
plugin enabled. Greedy ``spec`` equals vLLM without speculation; a cascade rule changes
acceptance the way the rule says; sampled requests follow the rule's law (chi-squared against the
law computed with transformers); a seeded request emits the same tokens alone or batched."""
from __future__ import annotations

import pytest
import torch

from . import require_vllm

require_vllm()

from vllm import LLM, SamplingParams  # noqa: E402

import speccascade_fast as sc  # noqa: E402
from speccascade_fast.integrations import vllm as plugin  # noqa: E402

from ..helpers import chi2_pvalue  # noqa: E402

K = 4  # drafts per step
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "Water boils at", "The three primary colors are", "import numpy as np\n"]
ENGINE = dict(enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=64,
              disable_log_stats=False, seed=0)


def speculative(drafter) -> dict:
    return {"method": "draft_model", "model": str(drafter), "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def plain(pair_folders):
    """vLLM without speculation: the reference for greedy outputs."""
    verifier, _ = pair_folders
    llm = LLM(model=str(verifier), **ENGINE)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def cascade(pair_folders):
    """vLLM's draft-model speculation with the plugin (server default: spec)."""
    verifier, drafter = pair_folders
    llm = LLM(model=str(verifier), speculative_config=speculative(drafter),
              additional_config={"speccascade": {"rule": "spec", "log_every": 0}}, **ENGINE)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def texts(outs):
    return [o.outputs[0].token_ids for o in outs]


def vllm_counters(llm) -> dict:
    m = {x.name: x for x in llm.get_metrics()}
    return {k: m[f"vllm:spec_decode_{k}"].value for k in ("num_draft_tokens",
                                                          "num_accepted_tokens")}


def test_greedy_spec_equals_vllm_without_speculation(plain, cascade):
    params = SamplingParams(temperature=0, max_tokens=40)
    want = texts(plain.generate(PROMPTS, params))
    assert texts(cascade.generate(PROMPTS, params)) == want
    # token_v3 with alpha < 0 is spec exactly (its acceptable set is empty)
    exact = SamplingParams(temperature=0, max_tokens=40,
                           extra_args={"speccascade_rule": "token_v3", "speccascade_alpha": -0.5})
    assert texts(cascade.generate(PROMPTS, exact)) == want


def test_a_cascade_rule_changes_acceptance_as_it_says(cascade):
    """At T = 0, spec accepts a draft only where it is the verifier's argmax; token_v3 also where
    the verifier gives it at least (1 - alpha) of its top probability, so its acceptance grows
    with alpha; at alpha = 1 (and for rule 'drafter') every draft is accepted. vLLM's own
    spec-decode counters see the same acceptance as the plugin's statistics."""
    runs = [("spec", None), ("token_v3", 0.3), ("token_v3", 0.8), ("token_v3", 1.0),
            ("drafter", None)]
    acceptance = []
    for rule, alpha in runs:
        extra = {"speccascade_rule": rule}
        if alpha is not None:
            extra["speccascade_alpha"] = alpha
        before, counters = plugin.stats(cascade).get(rule, {}), vllm_counters(cascade)
        cascade.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, extra_args=extra))
        after, counters2 = plugin.stats(cascade)[rule], vllm_counters(cascade)
        drafted = after["drafted"] - before.get("drafted", 0)
        accepted = after["accepted"] - before.get("accepted", 0)
        assert drafted > 0
        assert counters2["num_draft_tokens"] - counters["num_draft_tokens"] == drafted
        assert counters2["num_accepted_tokens"] - counters["num_accepted_tokens"] == accepted
        acceptance.append(accepted / drafted)
    spec, v3_low, v3_high, v3_one, drafter = acceptance
    assert 0.05 < spec < 0.9
    assert spec < v3_low < v3_high < v3_one == 1.0, acceptance
    assert drafter == 1.0
    stats = plugin.stats(cascade)
    assert stats["spec"]["deferral_rate"] == 1.0 and stats["drafter"]["deferral_rate"] < 1.0


@pytest.fixture(scope="module")
def hf_pair(pair_folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verifier, drafter = pair_folders
    tok = AutoTokenizer.from_pretrained(verifier)
    load = lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
    return tok, load(drafter), load(verifier)


def second_token_law_check(llm, hf_pair, rule, alpha, n=600):
    """T = 1: ``n`` requests of one prompt, two tokens each. The first comes from vLLM's sampler
    (prefill), the second from the plugin's first verification. Among the requests whose first
    token is the likeliest one, the second follows target_distribution(drafter, verifier) at
    that position (the drafter drew its draft from its qT there)."""
    tok, hf_drafter, hf_verifier = hf_pair
    ids = tok("Water boils at 100 degrees").input_ids
    extra = {"speccascade_rule": rule} | ({"speccascade_alpha": alpha} if alpha else {})
    params = [SamplingParams(temperature=1.0, max_tokens=2, seed=1000 + i, extra_args=extra)
              for i in range(n)]
    outs = llm.generate([{"prompt_token_ids": ids}] * len(params), params, use_tqdm=False)
    pairs = torch.tensor([o.outputs[0].token_ids for o in outs])
    first = int(pairs[:, 0].mode().values)
    second = pairs[pairs[:, 0] == first, 1]
    assert len(second) > 400
    with torch.no_grad():
        x = torch.tensor([ids + [first]])
        q, p = hf_drafter(x).logits[0, -1:], hf_verifier(x).logits[0, -1:]
    law = sc.target_distribution(q.double(), p.double(), rule=rule, alpha=alpha,
                                 temperature=1.0)[0]
    assert chi2_pvalue(second.long(), law) > 1e-4


@pytest.mark.parametrize("rule,alpha", [("spec", None), ("token_v3", 0.3)])
def test_sampled_requests_follow_the_rules_law(cascade, hf_pair, rule, alpha):
    second_token_law_check(cascade, hf_pair, rule, alpha)


def test_vllms_draft_probabilities_give_the_same_law(pair_folders, hf_pair):
    """draft="vllm" with vLLM's probabilistic drafting: vLLM draws the drafts and hands the
    plugin softmax(logits / T), which it verifies as log(probs) * T."""
    verifier, drafter = pair_folders
    llm = LLM(model=str(verifier), additional_config={"speccascade": {
        "rule": "token_v3", "draft": "vllm", "log_every": 0}},
        speculative_config=speculative(drafter) | {"draft_sample_method": "probabilistic"},
        **ENGINE)
    try:
        second_token_law_check(llm, hf_pair, "token_v3", 0.3)
        assert plugin.stats(llm)["token_v3"]["drafted"] > 0
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_seeded_request_same_alone_or_batched(cascade):
    one = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=7,
                         extra_args={"speccascade_rule": "token_v3"})
    alone = texts(cascade.generate(PROMPTS[:1], one, use_tqdm=False))[0]
    others = [SamplingParams(temperature=0.8, max_tokens=24) for _ in PROMPTS[1:]]
    batched = texts(cascade.generate(PROMPTS, [one] + others, use_tqdm=False))[0]
    assert batched == alone
    again = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24,
                            extra_args={"speccascade_rule": "token_v3"}) for _ in range(4)]
    unseeded = texts(cascade.generate(PROMPTS[:1] * 4, again, use_tqdm=False))
    assert len({tuple(t) for t in unseeded}) > 1


def test_bad_request_is_refused_naming_the_field(cascade):
    from vllm.exceptions import VLLMValidationError

    bad = SamplingParams(max_tokens=4, extra_args={"speccascade_rule": "chow",
                                                   "speccascade_alpha": 7})
    with pytest.raises(VLLMValidationError, match="speccascade_alpha"):
        cascade.generate(PROMPTS[:1], bad, use_tqdm=False)
    # the engine is unharmed
    assert len(cascade.generate(PROMPTS[:1], SamplingParams(max_tokens=4), use_tqdm=False)) == 1
