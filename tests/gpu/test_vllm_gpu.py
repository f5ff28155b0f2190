"""The vLLM plugin on a GPU (`.ci/gpu_run vllm`; docs/vllm.md): vLLM 0.32's V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``), the verification on the ``triton`` backend, SmolLM2-135M as the
verifier and the drafter of tests/vllm/pair.py.

* greedy ``spec`` emits vLLM's output without speculation, token for token;
* at T = 1 the first verified token follows ``token_v3``'s law (chi-squared against the law
  computed with transformers on the GPU's logits' model, as tests/vllm/test_vllm_llm.py).

Runs only where vLLM is installed next to a CUDA torch and the SmolLM2 weights are in place
(the device image has neither by default), and only with ``SPECCASCADE_VLLM_GPU=1`` (set by
`.ci/gpu_run vllm`: the `test` stage's parallel workers would share the GPU with the engine).
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("SPECCASCADE_VLLM_GPU") != "1",
                       reason="run by `.ci/gpu_run vllm` (SPECCASCADE_VLLM_GPU=1)"),
]
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the plugin wraps the V1 runner

ENGINE = dict(enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=64,
              gpu_memory_utilization=0.3, seed=0)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "Water boils at"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed on this machine")
    from speccascade_fast import models

    from ..vllm.pair import drafter_folder, verifier_folder

    try:
        verifier = verifier_folder()
    except (models.ModelNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"no SmolLM2 weights here ({e})")
    return verifier, drafter_folder(tmp_path_factory.mktemp("pair"), verifier)


def test_greedy_spec_equals_vllm_and_the_law_at_T1(folders):
    from vllm import LLM, SamplingParams

    import speccascade_fast as sc

    from ..helpers import chi2_pvalue

    verifier, drafter = folders
    greedy = SamplingParams(temperature=0, max_tokens=40)
    plain = LLM(model=str(verifier), **ENGINE)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, greedy)]
    plain.llm_engine.engine_core.shutdown()
    del plain

    llm = LLM(model=str(verifier), additional_config={"speccascade": {"rule": "spec"}},
              speculative_config={"method": "draft_model", "model": str(drafter),
                                  "num_speculative_tokens": 4}, **ENGINE)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    assert got == want

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(verifier)
    ids = tok("Water boils at 100 degrees").input_ids
    extra = {"speccascade_rule": "token_v3", "speccascade_alpha": 0.3}
    params = [SamplingParams(temperature=1.0, max_tokens=2, seed=i, extra_args=extra)
              for i in range(2000)]
    outs = llm.generate([{"prompt_token_ids": ids}] * len(params), params, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    pairs = torch.tensor([o.outputs[0].token_ids for o in outs])
    first = int(pairs[:, 0].mode().values)
    second = pairs[pairs[:, 0] == first, 1]
    load = lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([ids + [first]])
        q, p = load(drafter)(x).logits[0, -1:], load(verifier)(x).logits[0, -1:]
    law = sc.target_distribution(q.double(), p.double(), rule="token_v3", alpha=0.3,
                                 temperature=1.0)[0]
    assert chi2_pvalue(second.long(), law) > 1e-4
