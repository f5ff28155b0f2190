"""The engine on real weights CI can afford: SmolLM2-135M-Instruct as the verifier and its first
4 layers (same final norm and head) as an early-exit drafter, in fp32.

At T = 0 every lossless configuration must reproduce the verifier's own greedy output token for
token. (fp32 keeps the verify-vs-decode GEMM differences, M = gamma+1 rows against M = 1, far
below the logit gaps of these prompts; in bf16 a near-tie could flip a token: see the README.)
"""
import pytest

from speccascade_fast import generate

PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]
NEW = 12


@pytest.fixture(scope="module")
def greedy(smollm2):
    _, verifier, tok = smollm2
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        hf = verifier.generate(ids, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
        out[prompt] = (ids, hf[0, ids.shape[1]:])
    return out


LOSSLESS = [("spec_cascade", "spec", None), ("spec_cascade", "diff", -1.0),
            ("spec_cascade", "token_v3", -0.5), ("spec_cascade", "lossy", 0.0),
            ("oracle_cascade", "diff", -1.0), ("token_cascade", "chow", 0.0),
            ("autoregressive", None, None)]


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("method,rule,alpha", LOSSLESS)
def test_lossless_greedy_equals_the_verifier(smollm2, greedy, method, rule, alpha, gamma):
    drafter, verifier, _ = smollm2
    for ids, want in greedy.values():
        out = generate(drafter, verifier, ids, method=method, rule=rule, alpha=alpha, gamma=gamma,
                       temperature=0, max_new_tokens=NEW, eos_token_id=[])
        assert out.new_tokens[0] == want.tolist()


def test_cascade_counts_are_consistent(smollm2, greedy):
    drafter, verifier, _ = smollm2
    ids, _ = greedy[PROMPTS[1]]
    out = generate(drafter, verifier, ids, rule="token_v3", alpha=0.5, gamma=5, temperature=0,
                   max_new_tokens=NEW, eos_token_id=[])
    s = out.stats
    assert s["tokens"] == NEW and s["accepted"] <= s["drafted"]
    assert s["accepted"] + s["rejected"] <= s["drafted"]
    assert 0 <= s["rejection_rate"] <= 1 and 0 <= s["deferral_rate"] <= 1
