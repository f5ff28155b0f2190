"""Fixtures of the vLLM plugin's tests (importable without vLLM: each test module skips itself,
tests/vllm/__init__.py). vLLM's CPU engine refuses to start without ``VLLM_CPU_KVCACHE_SPACE``."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine


@pytest.fixture(scope="session")
def pair_folders(tmp_path_factory):
    """``(verifier, drafter)`` Hugging Face folders (tests/vllm/pair.py)."""
    from .pair import drafter_folder, verifier_folder

    verifier = verifier_folder()
    return verifier, drafter_folder(tmp_path_factory.mktemp("pair"), verifier)
