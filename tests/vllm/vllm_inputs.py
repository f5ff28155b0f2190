"""vLLM's rejection-sampler inputs built with vLLM's own classes (no engine): the
``SpecDecodeMetadata`` its model runner builds (``_calc_spec_decode_metadata``'s indices), a
``SamplingMetadata`` with per-request temperature / top-k / top-p / generators, and its
``Sampler`` for the bonus tokens."""
from __future__ import annotations

import numpy as np
import torch
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import RejectionSampler
from vllm.v1.sample.sampler import Sampler
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from speccascade_fast.integrations import vllm as plugin


def spec_metadata(draft_token_ids: list[list[int]]) -> SpecDecodeMetadata:
    """What GPUModelRunner._calc_spec_decode_metadata builds when each request scored its
    drafts and its bonus position (the logits are exactly those rows, in that order)."""
    n = np.array([len(d) for d in draft_token_ids], dtype=np.int32)
    sampled = n + 1
    cu_sampled = np.cumsum(sampled, dtype=np.int32)
    starts = cu_sampled - sampled
    target = np.concatenate([s + np.arange(k, dtype=np.int32) for s, k in zip(starts, n)])
    return SpecDecodeMetadata(
        draft_token_ids=torch.tensor(sum(draft_token_ids, []), dtype=torch.int32),
        num_draft_tokens=n.tolist(),
        cu_num_draft_tokens=torch.from_numpy(np.cumsum(n, dtype=np.int32)),
        cu_num_sampled_tokens=torch.from_numpy(cu_sampled),
        target_logits_indices=torch.from_numpy(target.astype(np.int32)),
        bonus_logits_indices=torch.from_numpy((cu_sampled - 1).astype(np.int32)),
        logits_indices=torch.arange(int(cu_sampled[-1]), dtype=torch.int32),
    )


def sampling_metadata(temperature, top_k=None, top_p=None, seeds=None, vocab=None):
    """vLLM's SamplingMetadata for B requests: ``temperature`` a list (0 = greedy); ``top_k`` /
    ``top_p`` lists (None: off, as vLLM stores it: V / 1.0); ``seeds`` {request: seed} (vLLM's
    per-request generators)."""
    B = len(temperature)
    greedy = [t == 0 for t in temperature]
    all_greedy, all_random = all(greedy), not any(greedy)
    tk = tp = None
    if top_k is not None:
        tk = torch.tensor([vocab if k is None else k for k in top_k], dtype=torch.int32)
    if top_p is not None:
        tp = torch.tensor([1.0 if p is None else p for p in top_p], dtype=torch.float32)
    gens = {}
    for b, s in (seeds or {}).items():
        gens[b] = torch.Generator().manual_seed(s)
    return SamplingMetadata(
        temperature=None if all_greedy else torch.tensor(temperature, dtype=torch.float32),
        all_greedy=all_greedy, all_random=all_random, top_p=tp, top_k=tk, generators=gens,
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(B), presence_penalties=torch.zeros(B),
        repetition_penalties=torch.ones(B), output_token_ids=[[] for _ in range(B)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )


def vllm_sampler() -> RejectionSampler:
    return RejectionSampler(Sampler())


def cascade_sampler(draft_kind="logits", **settings) -> RejectionSampler:
    """The plugin's sampler outside an engine (no runner: a request's rule is the server's,
    its seed its generator's, its position 0)."""
    cls = plugin._rejection_sampler_class()
    return cls(Sampler(), None, torch.device("cpu"), settings=plugin.Settings(**settings),
               draft_kind=draft_kind)


def use_vllm_cpu_kernels() -> None:
    """What vLLM's CPU platform does at start-up: its C++ stand-ins for the Triton kernels of
    the rejection sampler (the engine calls this; a test without an engine must)."""
    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()
