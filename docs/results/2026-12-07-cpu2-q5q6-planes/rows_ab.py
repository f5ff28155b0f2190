"""A decoding step (M = 1) and a 3-row call (M = 3) of each model (q4a8) with the kernel of
194875d (four rows per block up to M = 4) and of the next commit (two rows per block), both
builds in one process, alternating per round (6 rounds, the order swapped every other round),
12 calls per round and size, contexts of 100..500 tokens; medians in ms. Outputs are bit for bit
the same. Run from the repository root:
python docs/results/2026-12-07-cpu2-q5q6-planes/rows_ab.py"""
import pathlib
import subprocess
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "2026-12-07-cpu2-qmatmul-factors"))
import step_ab  # noqa: E402  (its interleaved timing loop)

from speccascade_fast.quant import kernels, modules  # noqa: E402

BEFORE, AFTER = "194875d", "4c37e42"
torch.set_num_threads(2)
libs = {}
for which, commit in (("before", BEFORE), ("after", AFTER)):
    src = pathlib.Path(f"/tmp/qmatmul-{commit}.cpp")
    src.write_bytes(subprocess.run(["git", "show", f"{commit}:speccascade_fast/quant/qmatmul.cpp"],
                                   check=True, capture_output=True).stdout)
    kernels.SOURCE = src  # built once, keyed by its bytes
    kernels._library.cache_clear()
    libs[which] = kernels._library()
layers: list = []


def keep(model) -> None:
    layers[:] = [m for m in model.modules() if isinstance(m, modules.QuantLinear)]


def use(which: str) -> None:
    kernels._library = lambda lib=libs[which]: lib
    for m in layers:  # (a prepared call holds its library's entry point)
        m._direct = None


for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
    res = step_ab.interleaved(name, use, sizes=(1, 3), on_model=keep)
    for n in (1, 3):
        print(f"{name} M={n}: {step_ab.compared(res, n, ('four rows', 'two rows'))}")
