"""Benchmarks (pytest-benchmark): run with ``pytest bench --benchmark-only``.

pyproject's ``python_files`` includes ``bench_*.py``; its ``testpaths = ["tests"]`` keeps them out
of a plain ``pytest`` run. The machine has few cores that other work may share: compare the
``min`` column, the medians are noisy.
"""
from __future__ import annotations

import torch


def pytest_report_header(config):
    from speccascade_fast import _ext

    ext = "loaded" if _ext.HAS_CPU_EXT else f"NOT loaded ({_ext.IMPORT_ERROR})"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads; _C {ext}"
