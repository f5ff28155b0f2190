"""One decoding step (M = 1) and one verification of 5 drafts (M = 6) of each model of the
default pair (q4a8), with its Q5_0 / Q6_K matrices stored as 8-bit codes a byte each ("bytes",
the layout before) and as a nibble plus one or two bit planes ("planes", as ggml stores them):
the same codes, the same kernel build, in one process; the two layouts alternate per round (6
rounds, the order swapped every other round), 12 calls per round and size, contexts of
100..500 tokens; medians in ms. Run from the repository root:
python docs/results/2026-12-07-cpu2-q5q6-planes/layout_ab.py"""
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "2026-12-07-cpu2-qmatmul-factors"))
import step_ab  # noqa: E402  (its interleaved timing loop)

from speccascade_fast.quant import modules  # noqa: E402

torch.set_num_threads(2)
layers: list = []
load = step_ab.load_model


def load_and_keep(*a, **k):  # the model interleaved() loads, to switch its layers' layout
    model, tok = load(*a, **k)
    layers[:] = [(m, m.codes, m.qh, m.bits, m.z, m.qweight.unpacked_codes().to(torch.int8))
                 for m in model.modules()
                 if isinstance(m, modules.QuantLinear) and m.bits in (5, 6)]
    return model, tok


def use(which: str) -> None:
    for m, codes, qh, bits, z, wide in layers:
        if which == "before":  # bytes
            m.bits, m.z, m.codes, m.qh = 8, 0, wide, None
        else:
            m.bits, m.z, m.codes, m.qh = bits, z, codes, qh


step_ab.load_model = load_and_keep
for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
    res = step_ab.interleaved(name, use)
    print(f"{name}: {len(layers)} matrices in Q5_0/Q6_K")
    for n in (1, 6):
        b, a = res[("before", n)], res[("after", n)]
        print(f"  M={n}: bytes {[round(x, 1) for x in b]} ms, planes {[round(x, 1) for x in a]} ms;"
              f" medians {statistics.median(b):.1f} / {statistics.median(a):.1f} ="
              f" {statistics.median(a) / statistics.median(b):.3f}x, per round "
              f"{[round(y / x, 3) for x, y in zip(b, a)]}")
