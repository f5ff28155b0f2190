"""Hugging Face ``custom_generate`` entry point: speculative cascades inside ``model.generate``.

    out = verifier.generate(**inputs, assistant_model=drafter, custom_generate="path/to/repo",
                            trust_remote_code=True, do_sample=False, max_new_tokens=64,
                            deferral_rule="token_v3", lenience=0.3)

transformers calls :func:`generate` with ``model=<the verifier>`` and every argument given to
``model.generate``; :func:`speccascade_fast.hf.generate` implements HF's contract (generation
config, streamer, stopping criteria, return type) on the speculative-cascade engine.
"""
from speccascade_fast.hf import generate

__all__ = ["generate"]
