"""Adapters that run speccascade_fast's verification inside other serving stacks.

* :mod:`speccascade_fast.integrations.vllm`: a vLLM plugin (entry point ``vllm.general_plugins``,
  extra ``[vllm]``) whose rejection step is :func:`speccascade_fast.verify_ragged` (docs/vllm.md).

Nothing here is imported by the package itself: each adapter imports its framework.
"""
