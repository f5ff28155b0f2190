"""One decoding step (q4a8, M = 1) of each model with QuantLinear's per-call path before and after
the prepared call (commit 86c4744), in one process: "before" re-creates the earlier forward
(the kernel choice checked and the weight's arguments converted on every call, through
kernels.matmul), "after" is the module's own forward; the two alternate per round (6 rounds,
the order swapped every other round), 12 steps each, contexts of 100..500 tokens; medians in ms.
Run from the repository root: python docs/results/2026-12-07-cpu2-qmatmul-factors/call_ab.py"""
import statistics

import torch
from step_ab import interleaved  # (this folder: the script's own directory is on sys.path)

from speccascade_fast.quant import kernels, modules

torch.set_num_threads(2)
after = modules.QuantLinear.forward


def before(self, x):  # the forward of 5b48cd1, for M <= DIRECT_ROWS with int8 activations
    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.K)
    if x2.device.type != "cpu":
        raise RuntimeError(f"int8 activations run on the CPU only, got {x2.device}")
    kernels.check_int8_activations()
    y = kernels.matmul(x2, self.qweight, self.bias, int8_activations=True)
    return y.view(*lead, self.N)


for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"):
    res = interleaved(name, lambda which: setattr(modules.QuantLinear, "forward",
                                                   before if which == "before" else after),
                      sizes=(1,))
    modules.QuantLinear.forward = after
    for which in ("before", "after"):
        v = res[(which, 1)]
        print(f"{name} {which}: per round {[round(x, 1) for x in v]} ms, median "
              f"{statistics.median(v):.1f}")
