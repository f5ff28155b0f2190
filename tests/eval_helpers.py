"""Shared eval test toys: a byte tokenizer, tiny random Llamas, a toy task, a call counter."""
from __future__ import annotations

import torch

from speccascade_fast.eval import Example, Task


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <eos>) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=vocab_size - 1,
                      pad_token_id=vocab_size - 1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


class ToyTask(Task):
    """Two prompts; the score is 1 when the output contains an 'a' (quality varies by config)."""

    name = "toy"
    metric = "accuracy"
    default_max_new_tokens = 12
    stop_strings = ("\n",)

    def examples(self, limit=None):
        return [Example("toy-0", {"q": "abc"}), Example("toy-1", {"q": "hello"})][:limit]

    def build_prompt(self, example, chat=False, tokenizer=None):
        return f"Q: {example.data['q']}\nA:"

    def score(self, example, prediction):
        return {"score": float("a" in prediction), "prediction_len": len(prediction)}


def counting(fn):
    calls = []

    def wrapped(*a, **kw):
        calls.append(kw)
        return fn(*a, **kw)

    wrapped.calls = calls
    return wrapped
