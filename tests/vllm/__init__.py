"""The vLLM plugin's tests. They need vLLM, which lives in its own virtual environment
(``.venv-vllm``, built by .ci/run's vLLM block; docs/vllm.md): without it each module is
skipped, unless ``SPECCASCADE_REQUIRE_VLLM=1`` (set by that block) makes a missing vLLM an error."""
from __future__ import annotations

import os

import pytest


def require_vllm():
    """``import vllm``, or skip the calling module (an ImportError with
    ``SPECCASCADE_REQUIRE_VLLM=1``)."""
    if os.environ.get("SPECCASCADE_REQUIRE_VLLM") == "1":
        import vllm

        return vllm
    return pytest.importorskip(
        "vllm", reason="vLLM is not installed here: the plugin's tests run in .venv-vllm "
                       "(.ci/run's vLLM block, docs/vllm.md)")
