"""``Engine(attention="flash_attn")`` with the real flash-attn kernel (skipped unless a GPU and the
flash-attn package are there; CI runs the engine's side against a torch stand-in in
tests/test_attention.py).

* one ragged block (prompts of different lengths prefilled, then gamma + 1 tokens per row) gives
  the logits of the SDPA path up to bf16 rounding;
* the CUDA-graph path replays the kernel with the eager path's tokens.
"""
import importlib.util

import pytest
import torch

from speccascade_fast import Engine

from ..helpers import PROMPTS, left_padded, tiny_pair

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU and flash-attn")


@pytest.fixture(scope="module")
def pair():
    return tuple(m.to("cuda", torch.bfloat16) for m in tiny_pair(hidden=64))


def _block_logits(engine, ids):
    """The verifier's logits of a block of 4 tokens after each row's prompt (ragged)."""
    rows = [torch.tensor(p, device="cuda") for p in PROMPTS]
    tokens = torch.zeros(len(rows), engine.slots, dtype=torch.int64, device="cuda")
    for b, p in enumerate(rows):
        tokens[b, : p.numel()] = p
        tokens[b, p.numel(): p.numel() + 4] = ids[b]
    m = engine.p
    m.seen = [0] * len(rows)
    m.prefill(tokens, [p.numel() for p in rows])
    slots = torch.stack([torch.arange(p.numel(), p.numel() + 4, device="cuda") for p in rows])
    with torch.inference_mode():
        return m.forward(tokens.gather(1, slots), slots, engine.slots - 1, 4).float()


def test_block_logits_match_sdpa(pair):
    ids = torch.randint(0, 64, (len(PROMPTS), 4), device="cuda")
    got = [_block_logits(Engine(*pair, max_batch_size=3, max_seq_len=32, attention=a,
                                cuda_graphs=False), ids) for a in ("flash_attn", None)]
    torch.testing.assert_close(got[0], got[1], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kw", [dict(rule="spec", temperature=0.0),
                                dict(rule="token_v3", alpha=0.3, temperature=1.0)])
def test_graphs_replay_the_kernel(pair, kw):
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask.cuda(), seed=[3, 4, 5], max_new_tokens=[5, 17, 24],
               eos_token_id=[])
    settings = dict(max_batch_size=3, max_seq_len=64, attention="flash_attn", **kw)
    eager = Engine(*pair, cuda_graphs=False, **settings).generate(ids.cuda(), **run)
    graphs = Engine(*pair, cuda_graphs=True, **settings).generate(ids.cuda(), **run)
    assert graphs.new_tokens == eager.new_tokens
