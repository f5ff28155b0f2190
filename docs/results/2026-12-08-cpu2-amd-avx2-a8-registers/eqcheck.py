"""Two builds of qmatmul.cpp give the same qm_matmul_a8 outputs bit for bit: every layout of
the test suite, K with and without a part-filled last chunk of codes, M = 1..8, fp32 and bf16
activations (N = 37 rows). Run from the repository's root:

    python docs/results/2026-12-08-cpu2-amd-avx2-a8-registers/eqcheck.py before.cpp after.cpp
"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from kbench import build  # noqa: E402  (this folder's benchmark: the same build and bindings)

from speccascade_fast.quant import formats, kernels  # noqa: E402
from tests.test_quantize import LAYOUTS, layout_weight  # noqa: E402

KINDS = ["Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0", "Q4_1", "int8", "rtn4", "g16", *LAYOUTS]


def weight(kind: str, N: int, K: int, g: torch.Generator):
    if kind == "int8":
        return formats.int8_per_channel(torch.randn(N, K, generator=g))
    if kind == "rtn4":
        return formats.rtn4(torch.randn(N, K, generator=g))
    if kind == "g16":
        codes = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        return formats.QuantizedWeight("g16", 8, 16, 1, N, K, codes,
                                       torch.rand(N, K // 16, generator=g) * 1e-2)
    return layout_weight(kind, N, K, seed=K)


def main() -> None:
    libs = [build(s) for s in sys.argv[1:3]]
    N, cases, different = 37, 0, 0
    for kind in KINDS:
        for K in (256, 288, 320, 512, 768, 1536):
            if K % 256 and kind[-1] == "K":
                continue  # K-quants come in super-blocks of 256
            g = torch.Generator().manual_seed(K)
            qw = weight(kind, N, K, g)
            for dt in (torch.float32, torch.bfloat16):
                flag = int(dt == torch.bfloat16)
                for M in range(1, 9):
                    x = (torch.randn(M, K, generator=g) * torch.linspace(0.1, 10, K)).to(dt)
                    outs = []
                    for lib in libs:
                        y = torch.empty(M, N, dtype=dt)
                        rc = lib.qm_matmul_a8(x.data_ptr(), flag, M, *kernels._layout_args(qw),
                                              y.data_ptr(), flag, N, None, 2)
                        assert rc == 0, (kind, K, rc)
                        outs.append(y)
                    cases += 1
                    if not torch.equal(outs[0], outs[1]):
                        different += 1
                        print("different:", kind, K, dt, M)
    print(f"{cases} cases, {different} different")


if __name__ == "__main__":
    main()
