"""Test-wide setup. Deliberately minimal: nothing here skips or deselects tests."""
from __future__ import annotations


def pytest_report_header(config):
    from speccascade_fast import _ext

    if _ext.HAS_CPU_EXT:
        return f"speccascade_fast._C: loaded (CUDA kernels: {_ext.HAS_CUDA_EXT})"
    return f"speccascade_fast._C: NOT loaded ({_ext.IMPORT_ERROR})"
