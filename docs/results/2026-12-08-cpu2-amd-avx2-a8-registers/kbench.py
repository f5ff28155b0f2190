"""Two builds of speccascade_fast/quant/qmatmul.cpp side by side: ``qm_matmul_a8`` (int8
activations, bf16 in and out, 2 threads) on the 1.5B verifier's own quantised matrices.

    git show 9bb13d4:speccascade_fast/quant/qmatmul.cpp > before.cpp
    git show 9ef80e1:speccascade_fast/quant/qmatmul.cpp > after.cpp
    python kbench.py before.cpp,after.cpp 1,6 7      # sources, rows M, rounds

Each source is compiled with the flags of speccascade_fast.quant.kernels (-O3 -march=native).
For each kind of matrix (e.g. every layer's gate_proj, Q4_K) one call per layer (up to 28),
so a call reads weights the previous calls did not; per round every build once, every other
round in reverse order. A figure is the median of all calls of that build. ``same`` says
whether the builds' outputs of the first round are equal bit for bit.
"""
import ctypes
import os
import statistics
import subprocess
import sys
import time

import torch

from speccascade_fast.models import load_model
from speccascade_fast.quant import kernels
from speccascade_fast.quant.modules import _Quantized


def build(src: str) -> ctypes.CDLL:
    so = f"/tmp/{os.path.basename(src)}.so"
    subprocess.run(["g++", *kernels._FLAGS, src, "-o", so], check=True)
    dll = ctypes.CDLL(so)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.qm_matmul_a8.argtypes = [p, i32, i64, p, i32, i32, i32, p, p, p, p, p, i32, i64, i64,
                                 p, i32, i64, p, i32]
    return dll


def main() -> None:
    torch.set_num_threads(2)
    libs = {os.path.basename(s): build(s) for s in sys.argv[1].split(",")}
    rows = [int(v) for v in sys.argv[2].split(",")]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    verifier, _ = load_model("qwen2.5-coder-1.5b-instruct", weights="q4a8", progress=False)
    groups: dict[str, list] = {}
    for name, mod in verifier.named_modules():
        if isinstance(mod, _Quantized) and "embed" not in name:
            groups.setdefault(f"{name.split('.')[-1]} {mod.kind}", []).append(mod.qweight)
    for M in rows:
        for key, qws in sorted(groups.items()):
            qws = qws[:28]
            x = torch.randn(M, qws[0].K, dtype=torch.bfloat16)
            times: dict[str, list[float]] = {}
            first: dict[str, torch.Tensor] = {}
            for r in range(rounds):
                for v in (list(libs) if r % 2 == 0 else list(libs)[::-1]):
                    fn = libs[v].qm_matmul_a8
                    for qw in qws:
                        y = torch.empty(M, qw.N, dtype=torch.bfloat16)
                        t = time.perf_counter()
                        rc = fn(x.data_ptr(), 1, M, *kernels._layout_args(qw), y.data_ptr(), 1,
                                qw.N, None, 2)
                        times.setdefault(v, []).append(time.perf_counter() - t)
                        assert rc == 0
                    if r == 0:
                        first[v] = y.clone()
            same = all(torch.equal(first[list(libs)[0]], y) for y in first.values())
            cols = "  ".join(f"{v}: {1e6 * statistics.median(t):8.0f}us" for v, t in times.items())
            print(f"M={M} {key:22s} n={len(qws):3d} {cols}  same={same}", flush=True)


if __name__ == "__main__":
    main()
