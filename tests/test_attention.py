"""The engine's attention backends on tiny models.

``attention="flash_attn"`` is run here against a torch stand-in for flash-attn's
``flash_attn_with_kvcache`` written from its documented semantics
(:mod:`tests.flash_attn_stand_in`): the engine's side of the contract (heads-last caches, the
per-row ``cache_seqlens``, the bottom-right causal alignment every call relies on, sliding
windows, grouped heads) must give the tokens of the default SDPA path. The real kernel runs in
``tests/gpu/test_flash_attention_gpu.py`` where flash-attn is installed.
"""
from __future__ import annotations

import sys

import pytest
import torch

from speccascade_fast import Engine, attention, generate
from speccascade_fast.kv_cache import SlotCache

from . import flash_attn_stand_in
from .helpers import PROMPTS, left_padded, qwen2_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CASES = [
    dict(rule="spec", temperature=0.0),
    dict(rule="token_v3", alpha=0.3, temperature=1.0),
    dict(rule="spec", temperature=1.0, gamma=1),
    dict(rule="lossy", alpha=0.2, temperature=0.7, gamma=4, bonus="verifier"),
    dict(method="autoregressive", temperature=1.0),
    dict(method="drafter_only", temperature=0.0),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_flash_attn_gives_the_sdpa_tokens(pair, flash_stand_in, kw):
    """Prompts of different lengths (ragged prefill), EOS inside blocks, every call shape."""
    ids, mask = left_padded(PROMPTS)
    run = dict(max_new_tokens=21, seed=5, engine="static", **kw)
    free = generate(*pair, ids, attention_mask=mask, eos_token_id=[], **run).new_tokens
    eos = [free[0][9]]  # a token the free run emits mid-way: a row stops inside a block
    before = flash_stand_in[0]
    flash = generate(*pair, ids, attention_mask=mask, eos_token_id=eos, attention="flash_attn",
                     **run)
    sdpa = generate(*pair, ids, attention_mask=mask, eos_token_id=eos, **run)
    assert flash_stand_in[0] > before  # the kernel ran, not the models' own attention
    assert flash.new_tokens == sdpa.new_tokens
    for k in ("tokens", "verifier_calls", "drafter_calls", "accepted", "deferred"):
        assert flash.stats[k] == sdpa.stats[k], k
    for m in pair:  # the models keep their own attention outside the engine
        assert m.config._attn_implementation == "sdpa"


def test_flash_attn_sliding_windows_and_a_reused_engine(flash_stand_in):
    """Qwen2 with 4-token windows on one of its two layers: window_size=(3, 0) there."""
    models = qwen2_pair()
    assert "sliding_attention" in models[1].config.layer_types
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=16, eos_token_id=[], seed=[1, 2, 3])
    engines = [Engine(*models, max_batch_size=3, max_seq_len=32, rule="token_v3", gamma=3,
                      temperature=1.0, attention=a) for a in ("flash_attn", None)]
    for _ in range(2):  # the second generate reuses the caches
        flash, sdpa = (e.generate(ids, attention_mask=mask, **kw) for e in engines)
        assert flash.new_tokens == sdpa.new_tokens


@pytest.mark.parametrize("graphs_shapes", [False, True])
def test_flash_attn_one_token_prompt(pair, flash_stand_in, graphs_shapes, monkeypatch):
    """A 1-token prompt has nothing to prefill: its prefill row is all padding, at the trash
    slot; its cache_seqlens must stay inside the cache view (eager and fixed CUDA-graph shapes,
    which attend over the whole cache)."""
    ids, mask = left_padded([[7], [3, 5, 7, 9]])
    kw = dict(max_batch_size=2, max_seq_len=24, rule="spec", gamma=3, temperature=1.0)
    out = []
    for a in ("flash_attn", None):
        engine = Engine(*pair, attention=a, **kw)
        engine._full_kv = graphs_shapes  # what cuda_graphs=True attends over, without a GPU
        out.append(engine.generate(ids, attention_mask=mask, max_new_tokens=12, seed=[1, 2],
                                   eos_token_id=[]).new_tokens)
    assert out[0] == out[1]


def test_heads_last_cache_returns_the_same_views():
    """Both layouts hold the same keys and hand HF the same [B, H, kv_len, D] tensors."""
    torch.manual_seed(0)
    caches = [SlotCache(3, 10), SlotCache(3, 10, heads_last=True)]
    writes = [torch.tensor([[0, 1, 2], [9, 4, 5], [6, 7, 8]]), torch.tensor([[3], [6], [9]])]
    for slots in writes:
        k, v = torch.randn(2, 3, 2, slots.shape[1], 4)
        got = []
        for c in caches:
            c.bind(slots, 8)
            got.append(c.update(k, v, 0))
        for a, b in zip(*got):
            assert a.shape == (3, 2, 8, 4) and torch.equal(a, b)
    assert caches[1].keys[0].shape == (3, 10, 2, 4)
    assert torch.equal(caches[0].keys[0].transpose(1, 2), caches[1].keys[0])


def test_flash_attn_bad_settings(pair, monkeypatch):
    q, p = pair
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="attention must be None"):
        Engine(q, p, attention="flash")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # "import flash_attn" fails
    attention._flash_kernel.cache_clear()
    try:
        with pytest.raises(ValueError, match="flash-attn package"):
            Engine(q, p, attention="flash_attn")
        monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_stand_in)
        attention._flash_kernel.cache_clear()
        with pytest.raises(ValueError, match="fp16/bf16 models on CUDA"):  # fp32 on the CPU
            Engine(q, p, attention="flash_attn")
        with pytest.raises(ValueError, match="attention='flash_attn' needs the batched Engine"):
            generate(q, p, ids, method="token_cascade", rule="chow", attention="flash_attn")
    finally:
        attention._flash_kernel.cache_clear()
