"""One decoding step (M = 1) and one verification of 5 drafts (M = 6) of each model of the
default pair (q4a8), with its Q5_0 / Q6_K matrices stored as 8-bit codes a byte each ("bytes",
the layout before) and as a nibble plus one or two bit planes ("planes", as ggml stores them):
the same codes, the same kernel build, in one process; the two layouts alternate per round (6
rounds, the order swapped every other round), 12 calls per round and size, contexts of
100..500 tokens; medians in ms. Run from the repository root:
python docs/results/2026-12-07-cpu2-q5q6-planes/layout_ab.py"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "2026-12-07-cpu2-qmatmul-factors"))
import step_ab  # noqa: E402  (its interleaved timing loop)

from speccascade_fast.quant import modules  # noqa: E402

torch.set_num_threads(2)
layers: list = []


def keep(model) -> None:  # its Q5_0/Q6_K layers, with their codes in both layouts
    layers[:] = [(m, m.codes, m.qh, m.bits, m.z, m.qweight.unpacked_codes().to(torch.int8))
                 for m in model.modules()
                 if isinstance(m, modules.QuantLinear) and m.bits in (5, 6)]


def use(which: str) -> None:
    for m, codes, qh, bits, z, wide in layers:
        if which == "before":  # bytes
            m.bits, m.z, m.codes, m.qh = 8, 0, wide, None
        else:
            m.bits, m.z, m.codes, m.qh = bits, z, codes, qh


for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
    res = step_ab.interleaved(name, use, on_model=keep)
    print(f"{name}: {len(layers)} matrices in Q5_0/Q6_K")
    for n in (1, 6):
        print(f"  M={n}: {step_ab.compared(res, n, ('bytes', 'planes'))}")
