"""Test-wide setup. Deliberately minimal: nothing here skips or deselects tests.

Without a GPU the Triton kernels are tested in Triton's CPU interpreter, which only works when
``TRITON_INTERPRET=1`` is set the first time ``triton`` is imported: ``triton.jit`` reads it at
decoration time, for ``triton.language``'s own helpers (``tl.max``, ...) as for our kernels. Other
test modules import triton indirectly at collection (through transformers), so the switch is made
here, before any test module is imported. It is unset again right away (and set again around each
Triton test by that module's fixture) so that ``backend="auto"`` elsewhere keeps the fast CPU
backends instead of the slow interpreter.
"""
from __future__ import annotations

import os

import pytest


def _decorate_triton_for_the_interpreter() -> None:
    import torch

    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        from speccascade_fast import kernels  # noqa: F401
    except ImportError:  # no triton: tests/test_triton_backend.py fails on its own import
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


_decorate_triton_for_the_interpreter()


def pytest_report_header(config):
    from speccascade_fast import _ext

    if _ext.HAS_CPU_EXT:
        return f"speccascade_fast._C: loaded (CUDA kernels: {_ext.HAS_CUDA_EXT})"
    return f"speccascade_fast._C: NOT loaded ({_ext.IMPORT_ERROR})"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores):
    a module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def flash_stand_in(monkeypatch):
    """``import flash_attn`` gives the torch stand-in (tests/flash_attn_stand_in.py), which may
    run fp32 models on the CPU; yields its call counter."""
    import sys

    import torch

    from speccascade_fast import attention

    from . import flash_attn_stand_in

    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_stand_in)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float32,))
    attention._flash_kernel.cache_clear()
    yield flash_attn_stand_in.CALLS
    attention._flash_kernel.cache_clear()


@pytest.fixture(scope="module")
def pair():
    """The default tiny fp32 (drafter, verifier) Llama pair of ``tests.helpers.tiny_pair``,
    built once per module (a module may define its own ``pair``)."""
    from .helpers import tiny_pair

    return tiny_pair()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in fp32 (the verifier), its first 4 layers with the same final norm
    and head (an early-exit drafter), and its tokenizer: ``(drafter, verifier, tokenizer)``."""
    import torch

    from speccascade_fast import models

    verifier, tok = models.load_model(models.SMOLLM2, dtype=torch.float32, progress=False)
    return models.early_exit_drafter(verifier, 4), verifier, tok


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: a CLI's arguments must be refused first."""
    def load(*a, **kw):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("speccascade_fast.cli._load", load)
    monkeypatch.setattr("speccascade_fast.models.load_pair", load)
    monkeypatch.setattr("speccascade_fast.models.load_model", load)
