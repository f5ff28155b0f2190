"""Where a decoding step (M = 1, q4a8, batch 1, context ~300) goes: the time inside the quantised
linear layers (QuantLinear.forward, wrapped with a timer) against the whole step, for each model
of the default pair; 20 steps with the timer, 20 without before and after (the timer's own cost).
Run from the repository root: python docs/results/2026-12-07-cpu2-q5q6-planes/step_split.py"""
import collections
import statistics
import time

import torch

from speccascade_fast.kv_cache import SlotModel
from speccascade_fast.models import load_model
from speccascade_fast.quant import modules

torch.set_num_threads(2)
plain = modules.QuantLinear.forward
spent: dict = collections.defaultdict(float)


def timed(self, x):
    t = time.perf_counter()
    y = plain(self, x)
    spent[(self.kind, self.N, self.K)] += time.perf_counter() - t
    return y


for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
    model, _ = load_model(name, weights="q4a8", progress=False)
    sm = SlotModel(model, 1, 700)
    sm.forward(torch.randint(0, 1000, (1, 300)), torch.arange(300)[None], 300, 1)
    print(name)
    with torch.inference_mode():
        for mode in ("plain", "timed", "plain"):
            modules.QuantLinear.forward = timed if mode == "timed" else plain
            spent.clear()
            ts = []
            for i in range(20):
                t = time.perf_counter()
                sm.forward(torch.randint(0, 1000, (1, 1)), torch.tensor([[300 + i]]), 301 + i, 1)
                ts.append(time.perf_counter() - t)
            print(f"  {mode}: step median {statistics.median(ts) * 1e3:.1f} ms")
            if mode == "timed":
                print(f"    in the linear layers: {sum(spent.values()) / 20 * 1e3:.1f} ms per step")
                for (kind, N, K), v in sorted(spent.items(), key=lambda kv: -kv[1]):
                    print(f"      {kind} {N} x {K}: {v / 20 * 1e3:.2f} ms")
    modules.QuantLinear.forward = plain
