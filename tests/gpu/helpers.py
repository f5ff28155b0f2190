"""Shared helpers of the GPU tests: the Qwen vocabulary, a lenience per rule, LLM-like blocks."""

from .. import helpers

DEV = "cuda"

V, GAMMA = 151936, 5
ALPHA = {
    "spec": None, "drafter": None, "chow": 0.3, "chow_log": 1.0, "diff": 0.05, "diff_log": 0.2,
    "opt": 0.5, "opt_log": 0.5, "token_v1": 0.05, "token_v2": 0.1, "token_v3": 0.3,
    "lossy": 0.3, "lossy_star": 0.3, "bild": 1.5,
}


def llm_block(B, seed, *, gamma=GAMMA, **kw):
    """:func:`tests.helpers.llm_block` on the GPU at the Qwen vocabulary."""
    return helpers.llm_block(B, V, seed, gamma=gamma, device=DEV, **kw)
