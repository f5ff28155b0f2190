"""Quantised weights: the GGUF block formats kept exactly, our kernels and PyTorch's against the
de-quantised reference, load_model(weights=...), and decoding that stays exact."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch

from speccascade_fast import generate, models
from speccascade_fast.quant import formats, kernels, modules
from speccascade_fast.quantize import (
    WEIGHTS,
    Int8Linear,
    QuantEmbedding,
    QuantLinear,
    int8_weight_only,
    quantize_model,
)

from .helpers import PROMPTS, left_padded, tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# bytes per block of 32 (legacy types) or 256 (K types) weights
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144,
               "Q5_K": 176, "Q6_K": 210}
# where each block type keeps its fp16 factors (d, and dmin / m)
FP16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
           "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(kind: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """``N`` rows of ``K`` weights of GGUF type ``kind``: random bytes (every bit pattern of the
    codes and integer scales is a valid block) with finite fp16 factors."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(seed)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):  # gguf-py quantises these
        w = rng.standard_normal((N, K)).astype(np.float32)
        return quants.quantize(w, GGMLQuantizationType[kind])
    per = 256
    blocks = rng.integers(0, 256, (N, K // per, BLOCK_BYTES[kind]), dtype=np.uint8)
    for at in FP16_AT[kind]:
        f = (rng.uniform(0.5, 2.0, (N, K // per)) * 1e-3).astype(np.float16)
        blocks[..., at:at + 2] = f[..., None].view(np.uint8)
    return blocks.reshape(N, -1)


def reference(kind: str, data: np.ndarray, N: int, K: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[kind])).view(N, K)


# ---------------------------------------------------------------------------------------------
# formats and kernels


@pytest.mark.parametrize("kind", formats.SUPPORTED_GGUF)
def test_gguf_blocks_dequantise_exactly_as_gguf_py(kind):
    N, K = 24, 512
    data = random_blocks(kind, N, K)
    qw = formats.from_gguf(kind, data, N, K)
    ref = reference(kind, data, N, K)
    assert torch.equal(formats.dequantize(qw), ref)  # the torch reference: bit for bit
    if kernels.ours_available():
        assert torch.equal(kernels.dequant(qw), ref)  # our kernel: bit for bit
        rows = torch.tensor([5, 0, 23, 5])
        assert torch.equal(kernels.dequant(qw, rows), ref[rows])
        assert torch.equal(kernels.dequant(qw, rows, torch.bfloat16), ref[rows].bfloat16())
    # storage: the codes keep their width, Q5 and Q6 as a nibble plus one or two bit planes
    assert qw.bits == int(kind[1])
    code_bytes = qw.codes.numel() + (0 if qw.qh is None else qw.qh.numel())
    assert code_bytes == N * K * qw.bits // 8


needs_ours = pytest.mark.skipif(not kernels.ours_available(),
                                reason=f"our kernels are unavailable: {kernels.BUILD_ERROR}")


def nibble_weight(bits: int, G: int, N: int, K: int, seed: int = 0, offsets: bool = False):
    """Random ``bits``-bit codes (4, 5, 6) in the nibble layout with groups of ``G``, a random
    ``z``, per-group scales (and offsets): every layout the kernels dispatch on, GGUF's or
    not."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8).numpy()
    codes, qh = formats.pack_nibbles(values, bits)
    z = int(torch.randint(0, 1 << bits, (1,), generator=g))
    ng = K // G
    return formats.QuantizedWeight(
        f"nibble{bits}-g{G}", bits, G, 1, N, K, torch.from_numpy(codes),
        torch.rand(N, ng, generator=g) * 1e-2 + 1e-3,
        Mn=torch.randn(N, ng, generator=g) * 1e-2 if offsets else None,
        qh=None if qh is None else torch.from_numpy(qh), z=z)


LAYOUTS = ["nibble5-g16", "nibble6-g32", "nibble6-g16-offsets", "nibble4-offsets"]


def layout_weight(kind: str, N: int, K: int, seed: int = 1):
    """A GGUF type's random blocks, or one of LAYOUTS."""
    if kind.startswith("nibble"):
        bits, G = int(kind[6]), int(kind.split("-g")[1][:2]) if "-g" in kind else 32
        return nibble_weight(bits, G, N, K, seed, offsets=kind.endswith("offsets"))
    return formats.from_gguf(kind, random_blocks(kind, N, K, seed=seed), N, K)


def test_nibble_planes_round_trip():
    for bits in (4, 5, 6):
        for K in (128, 288, 512):  # 288: a part-filled last chunk of 128 inputs
            values = np.random.default_rng(bits).integers(0, 1 << bits, (3, K), dtype=np.uint8)
            codes, qh = formats.pack_nibbles(values, bits)
            assert codes.shape == (3, K // 2)
            assert (qh is None) == (bits == 4)
            if qh is not None:
                assert qh.shape == (3, -(-K // 128) * 16 * (bits - 4))
            back = formats.unpack_nibbles(torch.from_numpy(codes),
                                          None if qh is None else torch.from_numpy(qh), bits, K)
            assert back.numpy().tolist() == values.astype(np.int32).tolist()
    # ggml's Q5_0 high bits (bit j of qh: weight j of the block) land where the kernels read them
    values = np.zeros((1, 128), dtype=np.uint8)
    values[0, 32 * 2 + 16 + 3] = 16  # block 2, input 19: the high nibbles' plane, bit 16 * 2 + 3
    _, qh = formats.pack_nibbles(values, 5)
    assert int.from_bytes(qh[0, 8:16].tobytes(), "little") == 1 << 35 and not qh[0, :8].any()


@pytest.mark.parametrize("bad", [
    dict(bits=5, qh=None), dict(bits=4, z=16), dict(bits=5, z=32), dict(bits=8, z=1),
    dict(bits=6, G=64), dict(bits=4, keep_qh=True), dict(qh=torch.zeros(2, 8, dtype=torch.uint8)),
    dict(int8_codes=True), dict(z=16.0), dict(z=True)])
def test_quantized_weight_rejects_a_bad_nibble_layout(bad):
    qw = nibble_weight(5, 32, 2, 128)
    fields = dict(kind="bad", bits=5, G=32, gps=1, N=2, K=128, codes=qw.codes, D=qw.D,
                  qh=qw.qh, z=0)
    if bad.get("bits") == 4 and not bad.pop("keep_qh", False):
        fields["qh"] = None
    if bad.get("bits") == 8:
        fields.update(codes=torch.zeros(2, 128, dtype=torch.int8), qh=None)
    if bad.pop("int8_codes", False):  # nibbles are unsigned bytes
        fields["codes"] = qw.codes.view(torch.int8)
    fields.update(bad)
    with pytest.raises(ValueError, match="bad: "):
        formats.QuantizedWeight(**fields)
    with pytest.raises(ValueError, match="pack_nibbles"):
        formats.pack_nibbles(np.full((1, 32), 32), 5)
    assert formats.QuantizedWeight(**{**fields, **dict(qh=qw.qh, z=np.int64(3), bits=5, G=32,
                                                       codes=qw.codes)}).z == 3


def _build(monkeypatch, tmp_path, march: str):
    """Our kernels built with ``-march=<march>`` in place of ``-march=native``, loaded (the
    builder itself, not its cache: the native library stays the cached one)."""
    with monkeypatch.context() as m:
        m.setattr(kernels, "_FLAGS", [(f"-march={march}" if f == "-march=native" else f)
                                      for f in kernels._FLAGS])
        m.setattr(kernels, "_build_dir", lambda: tmp_path)
        lib = kernels._library.__wrapped__()
        why = kernels.BUILD_ERROR
    assert lib is not None, why
    return lib


@needs_ours
@pytest.mark.parametrize("march, path", [("x86-64-v2", "portable"), ("x86-64-v3", "avx2")])
def test_every_path_gives_the_native_outputs_bit_for_bit(monkeypatch, tmp_path, march, path):
    """The kernels' paths for CPUs without AVX-512: the portable one (QW::code, one weight at a
    time; built with -march=x86-64-v2) and AVX2 + FMA (8-lane halves; -march=x86-64-v3) give
    the de-quantised weights and the products of the natively built library bit for bit
    (AVX-512 where this CPU has it), in fp32 and bf16, and the AVX2 build's int8-activation
    products those of the native int8-activation kernel (VNNI or AVX2); the products stay
    within fp32 rounding of the float64 reference."""
    if kernels.vector_path() == "portable" and path == "avx2":
        pytest.skip("this CPU has no AVX2 + FMA to run the x86-64-v3 build")

    def weight(kind, K):
        g = torch.Generator().manual_seed(K)
        if kind == "int8":
            return formats.int8_per_channel(torch.randn(9, K, generator=g))
        if kind == "rtn4":
            return formats.rtn4(torch.randn(9, K, generator=g))
        if kind == "g16":  # 8-bit codes in groups of 16
            return formats.QuantizedWeight(
                "g16", 8, 16, 1, 9, K, torch.randint(-128, 128, (9, K), generator=g,
                                                     dtype=torch.int8),
                torch.rand(9, K // 16, generator=g) * 1e-2)
        return layout_weight(kind, 9, K, seed=4)

    def outputs(qw, x, bias):  # M = 1 (a decoding step: two weight rows per block), 3, 6
        out = []
        for m in (1, 3, 6):
            out += [kernels.matmul(x[:m], qw, bias),
                    kernels.matmul(x[:m].bfloat16(), qw, bias.bfloat16())]
            if a8:
                out.append(kernels.matmul(x[:m], qw, bias, int8_activations=True))
        return out

    a8 = kernels.has_int8_activations() and path == "avx2"
    cases = []
    for kind in ("Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0", "Q4_1", "int8", "rtn4", "g16",
                 *LAYOUTS):
        for K in (256, 288, 768):
            if K % 256 and kind[-1] == "K":
                continue
            qw = weight(kind, K)
            x = torch.randn(6, K, generator=torch.Generator().manual_seed(K)) * 3
            bias = torch.randn(9, generator=torch.Generator().manual_seed(1))
            cases.append((kind, qw, x, bias, outputs(qw, x, bias)))
    lib = _build(monkeypatch, tmp_path, march)
    assert (bool(lib.qm_has_avx512()), bool(lib.qm_has_avx2()), bool(lib.qm_has_a8())) == \
        (False, path == "avx2", path == "avx2")
    monkeypatch.setattr(kernels, "_library", lambda: lib)
    for kind, qw, x, bias, native in cases:
        w = formats.dequantize(qw)
        assert torch.equal(kernels.dequant(qw), w), kind
        assert torch.equal(kernels.dequant(qw, dtype=torch.bfloat16), w.bfloat16()), kind
        got = outputs(qw, x, bias)
        assert all(torch.equal(a, b) for a, b in zip(got, native, strict=True)), kind
        scale = x.double().abs() @ w.double().abs().T + bias.double().abs()
        ref = x.double() @ w.double().T + bias.double()
        y = kernels.matmul(x, qw, bias).double()
        assert ((y - ref).abs() <= 1e-6 * scale).all(), kind


@needs_ours
def test_nibble_weights_without_rows():
    qw = formats.from_gguf("Q6_K", np.zeros((0, 210), dtype=np.uint8), 0, 256)
    assert kernels.dequant(qw).shape == (0, 256)
    assert kernels.matmul(torch.randn(2, 256), qw).shape == (2, 0)
    if kernels.has_int8_activations():
        assert kernels.matmul(torch.randn(2, 256), qw, int8_activations=True).shape == (2, 0)


@needs_ours
@pytest.mark.parametrize("kind", ["Q5_0", "Q6_K", "Q5_K"])
def test_nibble_planes_multiply_as_the_8_bit_codes_did(kind):
    """Q5 and Q6 codes in a nibble and bit planes: the fp32 kernel's outputs are bit for bit
    those of the same codes stored a byte each (the layout before the planes), and both
    de-quantise alike."""
    N, K = 20, 512
    qw = formats.from_gguf(kind, random_blocks(kind, N, K, seed=2), N, K)
    wide = dataclasses.replace(qw, bits=8, codes=qw.unpacked_codes().to(torch.int8), qh=None,
                               z=0)
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kernels.matmul(x, qw), kernels.matmul(x, wide))
    assert torch.equal(kernels.dequant(qw), kernels.dequant(wide))


@needs_ours
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0", "Q4_1",
                                  *LAYOUTS])
# 768: 24 groups of 32, a part-filled vector of 16; 288: a part-filled last chunk of 128 inputs
@pytest.mark.parametrize("K", [512, 768, 288])
def test_our_matmul_is_the_reference_matmul_and_row_invariant(kind, K):
    N = 40  # 40 rows: row blocks of 4 and 2 plus a remainder
    if K % 256 and kind[:2] in ("Q4", "Q5", "Q6") and kind[-1] == "K":
        pytest.skip("K-quants come in super-blocks of 256")
    qw = layout_weight(kind, N, K)
    w = formats.dequantize(qw).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, K, generator=g)
    bias = torch.randn(N, generator=g)
    y = kernels.matmul(x, qw, bias)
    ref = x.double() @ w.T + bias.double()
    # fp32 accumulation of exact weights: relative to the sum of |terms|
    scale = (x.double().abs() @ w.abs().T) + bias.double().abs()
    assert ((y.double() - ref).abs() <= 1e-6 * scale).all()
    # each row's outputs are the same whatever the number of rows multiplied with it
    for rows in ([0], [3, 4], list(range(6)), list(range(9))):
        assert torch.equal(kernels.matmul(x[rows], qw, bias), y[rows])
    # bf16 in and out: x converted exactly, the fp32 result rounded once
    xb = x.bfloat16()
    yb = kernels.matmul(xb, qw, bias.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, kernels.matmul(xb.float(), qw, bias.bfloat16().float()).bfloat16())


@pytest.mark.skipif(not kernels.ours_available(), reason="needs our quantised kernel")
@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("gps", [1, 2, 3, 4, 6, 8, 16, 32])
def test_group_factors_of_every_super_block_size_bit_for_bit(bits, gps):
    """Every groups-per-super-block spread of the kernel's group factors (and a part-filled last
    vector of 16 groups), with offsets: one-hot rows of x read single weights out of the
    matmul exactly, compared bit for bit with the de-quantisation kernel (another code path)."""
    g = torch.Generator().manual_seed(gps)
    N, ng = 6, {16: 48, 32: 96}.get(gps, 72)  # 72 groups: a part-filled last vector of 16
    K = 32 * ng
    nsb = ng // gps
    codes = (torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8) if bits < 8
             else torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8))
    qh = (torch.randint(0, 256, (N, -(-K // 128) * 16 * (bits - 4)), generator=g,
                        dtype=torch.uint8) if bits in (5, 6) else None)
    qw = formats.QuantizedWeight("test", bits, 32, gps, N, K, codes,
                                 torch.rand(N, nsb, generator=g) + 0.5,
                                 sc=torch.randint(-128, 128, (N, ng), generator=g, dtype=torch.int8),
                                 Mn=torch.rand(N, nsb, generator=g),
                                 mq=torch.randint(-128, 128, (N, ng), generator=g, dtype=torch.int8),
                                 qh=qh, z=3 if bits < 8 else 0)
    w = kernels.dequant(qw)
    assert torch.equal(w, formats.dequantize(qw))
    cols = torch.randint(0, K, (11,), generator=g)
    x = torch.nn.functional.one_hot(cols, K).float()
    assert torch.equal(kernels.matmul(x, qw), w[:, cols].T)


needs_a8 = pytest.mark.skipif(not kernels.has_int8_activations(),
                              reason="int8 activations need our kernel and AVX-512 VNNI or AVX2")


def test_quantize_activations_by_hand():
    x = torch.zeros(2, 64)
    x[0, :4] = torch.tensor([1.0, -0.5, 0.25, 2.0])  # block 0: max |x| = 2, scale 2/127
    x[0, 32] = -3.0  # block 1: one value
    x[1, 40] = float(2 ** -130)  # 127 / max|x| overflows: the block counts as zeros
    x[1, 0], x[1, 1], x[1, 2] = 127.0, 2.5, -3.5  # ties round to even: 2 and -4
    q, d = formats.quantize_activations(x)
    assert q.dtype == torch.int8 and d.shape == (2, 2)
    assert q[0, :4].tolist() == [64, -32, 16, 127]  # 63.5 -> 64 and 31.75 -> 32 (nearest)
    assert q[0, 32].item() == -127 and q[1, :3].tolist() == [127, 2, -4]
    assert d[0].tolist() == pytest.approx([2 / 127, 3 / 127], rel=1e-7)
    assert d[1, 1].item() == 0.0 and not q[1, 32:].any()
    with pytest.raises(ValueError, match="multiple of 32"):
        formats.quantize_activations(torch.zeros(1, 48))


@needs_a8
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0", "Q4_1", "int8",
                                  "rtn4", "g16", *LAYOUTS])
# 288: a last chunk of codes under 64 bytes; 768: 24 groups of 32, a part-filled vector of 16
@pytest.mark.parametrize("K", [512, 768, 320, 288])
def test_int8_activation_matmul_is_its_reference_and_row_invariant(kind, K):
    N = 37  # row blocks of 4 and 2 plus a remainder
    g = torch.Generator().manual_seed(3)
    if kind in ("int8", "rtn4"):
        w = torch.randn(N, K, generator=g)
        qw = formats.int8_per_channel(w) if kind == "int8" else formats.rtn4(w)
    elif kind == "g16":  # 8-bit codes in groups of 16, a factor per group (no GGUF type)
        codes = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        qw = formats.QuantizedWeight("g16", 8, 16, 1, N, K, codes,
                                     torch.rand(N, K // 16, generator=g) * 1e-2)
    else:
        if K % 256 and kind in ("Q4_K", "Q5_K", "Q6_K"):
            pytest.skip("K-quants come in super-blocks of 256")
        qw = layout_weight(kind, N, K)
    x = torch.randn(11, K, generator=g) * torch.linspace(0.1, 10, K)  # blocks of unequal size
    x[2, :64] = 0.0  # blocks of zeros
    bias = torch.randn(N, generator=g)
    y = kernels.matmul(x, qw, bias, int8_activations=True)
    ref = formats.matmul_a8_reference(x, qw, bias)
    # fp32 accumulation of exact integer dot products: relative to the sum of |terms|
    s, o = qw.scales_offsets()
    q, d = formats.quantize_activations(x)
    xq = (q.double() * d.double().repeat_interleave(32, 1)).abs()
    G = qw.G
    codes = qw.unpacked_codes().double().abs() * s.double().abs().repeat_interleave(G, 1)
    scale = xq @ codes.T + x.double().abs() @ o.double().abs().repeat_interleave(G, 1).T \
        + bias.double().abs()
    assert ((y.double() - ref).abs() <= 2e-6 * scale).all()
    # and close to the exact product: the activations' rounding is at most half a step per block
    exact = x.double() @ formats.dequantize(qw).double().T + bias.double()
    assert ((y.double() - exact).abs() <= 0.5 / 127 * scale + 1e-5).all()
    for rows in ([0], [3, 4], list(range(6)), list(range(9))):
        assert torch.equal(kernels.matmul(x[rows], qw, bias, int8_activations=True), y[rows])
    xb = x.bfloat16()
    yb = kernels.matmul(xb, qw, bias.bfloat16(), int8_activations=True)
    assert torch.equal(yb, kernels.matmul(xb.float(), qw, bias.bfloat16().float(),
                                          int8_activations=True).bfloat16())


@needs_a8
@pytest.mark.parametrize("kind", ["rtn4", "int8"])  # with offsets, and without
def test_int8_activation_matmul_propagates_nan_and_inf(kind):
    w = torch.randn(8, 64)
    qw = formats.rtn4(w) if kind == "rtn4" else formats.int8_per_channel(w)
    x = torch.randn(5, 64)
    x[0, 5] = float("inf")
    x[1, 40] = float("nan")  # among inputs 0..15 of its block
    x[2, 3] = float("nan")
    x[3, 60] = float("-inf")  # among inputs 16..31
    y = kernels.matmul(x, qw, None, int8_activations=True)
    assert y[:4].isnan().all() and y[4].isfinite().all()


@needs_a8
def test_int8_activation_matmul_is_the_same_on_every_thread_count():
    g = torch.Generator().manual_seed(5)
    qw = formats.from_gguf("Q4_K", random_blocks("Q4_K", 2048, 512, seed=4), 2048, 512)
    x = torch.randn(6, 512, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.matmul(x, qw, None, int8_activations=True)
        torch.set_num_threads(2)  # 2048 x 512 x 2 passes: enough work for both threads
        assert torch.equal(kernels.matmul(x, qw, None, int8_activations=True), one)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not kernels.ours_available(), reason="needs our quantised kernel")
def test_quant_linear_reuses_its_prepared_call_until_something_changes(monkeypatch):
    """A layer converts its kernel arguments once (kernels.prepare) and reuses them while the
    activations' dtype and its tensors stay as they were; SPECCASCADE_QUANT_KERNEL is read
    when it prepares (a change applies after .to() or to a new layer)."""
    g = torch.Generator().manual_seed(5)
    qw = formats.rtn4(torch.randn(40, 96, generator=g))
    ql = QuantLinear(qw, torch.randn(40, generator=g), dtype=torch.float32)
    made = []
    real = kernels.prepare
    monkeypatch.setattr(kernels, "prepare", lambda *a, **k: made.append(a[2]) or real(*a, **k))
    x = torch.randn(3, 96, generator=g)
    ref = lambda: kernels.matmul(x, ql.qweight, ql.bias)  # noqa: E731
    assert torch.equal(ql(x), ref()) and torch.equal(ql(x[:1]), ref()[:1])
    assert made == [torch.float32]
    assert torch.equal(ql(x.bfloat16()), kernels.matmul(x.bfloat16(), ql.qweight, ql.bias))
    assert made == [torch.float32, torch.bfloat16]
    assert torch.equal(ql(x.T.contiguous().T), ref())  # a non-contiguous input: made contiguous
    with torch.no_grad():
        ql.bias.add_(1.0)  # in place: the prepared call reads the same tensor
    assert torch.equal(ql(x), ref())
    ql.bias = torch.nn.Parameter(torch.zeros(40), requires_grad=False)  # a new tensor
    assert torch.equal(ql(x), kernels.matmul(x, ql.qweight, None))
    new = formats.rtn4(torch.randn(40, 96, generator=g))
    ql._buffers["codes"] = new.codes  # replaced behind nn.Module's back: noticed
    assert torch.equal(ql(x), ref())
    ql._buffers["D"] = ql.D * 2  # any of the five, e.g. as torch.func.functional_call does
    assert torch.equal(ql(x), ref())
    b2 = torch.randn(40, generator=g)
    assert torch.equal(torch.func.functional_call(ql, {"bias": b2}, (x,)),
                       kernels.matmul(x, ql.qweight, b2))
    assert torch.equal(ql(x), ref())
    twin = copy.deepcopy(ql)  # a copy points into its own tensors, not the original's
    before = ql(x)
    with torch.no_grad():
        ql.codes.zero_()  # in place: the original sees it, the copy does not
    assert torch.equal(twin(x), before) and not torch.equal(ql(x), before)
    assert torch.equal(pickle.loads(pickle.dumps(twin))(x), before)
    n = len(made)
    monkeypatch.setenv("SPECCASCADE_QUANT_KERNEL", "torch")
    assert torch.equal(ql(x), ref()) and len(made) == n  # read when the call was prepared
    ql.to(torch.float32)  # .to() forgets the prepared call: the new choice applies
    assert torch.equal(ql(x), ql._torch_matmul(x))  # PyTorch's kernel
    assert len(made) == n


class _Net(torch.nn.Module):
    """An embedding, two linear layers and exact elementwise ops between them (relu, add): a
    compiled forward must give the eager values bit for bit."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 64)
        self.a = torch.nn.Linear(64, 96)
        self.b = torch.nn.Linear(96, 64)

    def forward(self, ids):
        h = self.emb(ids)
        return h + self.b(torch.relu(self.a(h)))


def _quantised_net(weights):
    net = _Net()
    net.emb = QuantEmbedding(formats.rtn4(net.emb.weight), dtype=torch.float32)
    quantize_model(net, weights)
    assert isinstance(net.a, QuantLinear) and isinstance(net.emb, QuantEmbedding)
    return net


@pytest.mark.parametrize("weights", ["q4", "int8", pytest.param("q4a8", marks=needs_a8)])
def test_quantised_modules_compile_without_graph_breaks(weights):
    """Under torch.compile each quantised module is one opaque operator
    (``speccascade::quant_module``): the model is one graph around our kernels (ctypes calls
    that Dynamo cannot trace), its values are the eager ones, and another instance of the same
    model runs the same compiled code (the module's handle is a graph input, not a constant)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    net, other = _quantised_net(weights), _quantised_net(weights)
    ids = torch.tensor([[1, 7, 3], [4, 4, 49]])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    counter = CompileCounter()
    with torch.inference_mode():
        for model in (net, other, net):
            assert torch.equal(torch.compile(model, backend=counter)(ids), model(ids))
        assert not torch.equal(net(ids), other(ids))  # (other weights: each called as itself)
    assert counter.frame_count == 1
    compiled = torch.compile(net, dynamic=True)
    with torch.inference_mode():
        for rows in (ids, ids[:1], torch.tensor([[5]])):
            assert torch.equal(compiled(rows), net(rows))


@pytest.mark.parametrize("kernel", ["ours", "torch"])
def test_compiled_quant_linear_takes_each_path(kernel, monkeypatch):
    """The operator runs the module's own forward, whichever path it takes: our kernel up to
    DIRECT_ROWS rows, de-quantised slices and F.linear beyond, or PyTorch's kernels."""
    monkeypatch.setenv("SPECCASCADE_QUANT_KERNEL", kernel)
    torch.manual_seed(0)
    lin = QuantLinear(formats.rtn4(torch.randn(32, 64)), torch.randn(32), dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lin, dynamic=True)
    for rows in (1, modules.DIRECT_ROWS + 1):
        x = torch.randn(2, rows, 64)
        assert torch.equal(compiled(x), lin(x)) and compiled(x).shape == (2, rows, 32)


def test_quantised_module_copies_are_called_as_themselves():
    """A copy of a quantised module has a handle of its own: a compiled graph of the copy calls
    the copy's weights, not the original's."""
    torch.manual_seed(0)
    lin = QuantLinear(formats.rtn4(torch.randn(16, 64)), dtype=torch.float32)
    twin = copy.deepcopy(lin)
    assert int(twin.handle) != int(lin.handle)
    assert "handle" not in lin.state_dict()
    twin.codes = twin.codes ^ 0x11  # other weights
    x = torch.randn(2, 64)
    assert not torch.equal(twin(x), lin(x))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(twin)(x), twin(x))
    again = pickle.loads(pickle.dumps(lin))
    assert int(again.handle) not in (int(lin.handle), int(twin.handle))
    assert torch.equal(again(x), lin(x))


@needs_a8
def test_quant_linear_int8_activations(monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48)
    qw = formats.rtn4(lin.weight)
    ql = QuantLinear(qw, lin.bias, dtype=torch.float32, int8_activations=True)
    assert "int8 activations" in repr(ql)
    x = torch.randn(2, 3, 96)
    ref = formats.matmul_a8_reference(x.view(-1, 96), qw, lin.bias).view(2, 3, 48)
    assert torch.allclose(ql(x).double(), ref, atol=1e-5)
    # a prompt's prefill (more than DIRECT_ROWS rows) takes q4's de-quantised path
    xl = torch.randn(modules.DIRECT_ROWS + 1, 96)
    assert torch.allclose(ql(xl), xl @ formats.dequantize(qw).T + lin.bias, atol=1e-4)
    monkeypatch.setenv("SPECCASCADE_QUANT_KERNEL", "torch")  # no silent fallback
    ql.to(torch.float32)  # (the choice is read when a layer prepares its call)
    with pytest.raises(RuntimeError, match="q4a8.*SPECCASCADE_QUANT_KERNEL=torch"):
        ql(x)
    with pytest.raises(RuntimeError, match="q4a8"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(32, 8)), "q4a8")


@needs_a8
def test_int8_activations_round_away_last_bit_differences():
    """Why q4a8 has no greedy self-consistency test: the model's other ops (attention over 1 or
    over 10 queries) differ in the last bits, and rounding the activations to int8 turns some
    of those into a step of the int8 grid. A prefix computed in one call and token by token
    gives the same logits to a few ulps with q4, and visibly different ones with q4a8."""
    from transformers import DynamicCache

    _, verifier = tiny_pair()
    ids = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(0))
    gaps = {}
    for weights in ("q4", "q4a8"):
        model = quantize_model(copy.deepcopy(verifier), weights)
        with torch.inference_mode():
            full = model(ids).logits[0]
            cache = DynamicCache()
            first = model(ids[:, :4], past_key_values=cache, use_cache=True).logits[0]
            steps = [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0, 0]
                     for i in range(4, 10)]
        gaps[weights] = (full - torch.cat([first, torch.stack(steps)])).abs().max().item()
    assert gaps["q4"] < 1e-4 < gaps["q4a8"]


def test_quant_linear_qweight_follows_its_buffers():
    """The QuantizedWeight a layer multiplies with is made once, and again when a buffer is
    replaced (or the module moved or cast)."""
    ql = QuantLinear(formats.rtn4(torch.randn(16, 64)), None, dtype=torch.float32)
    first = ql.qweight
    assert ql.qweight is first
    x = torch.randn(2, 64)
    y = ql(x)
    ql.D = ql.D * 2  # a new scale tensor: outputs double (no offset change would keep them)
    ql.Mn = ql.Mn * 2
    assert ql.qweight is not first and torch.equal(ql.qweight.D, ql.D)
    assert torch.allclose(ql(x), 2 * y, rtol=1e-5, atol=1e-5)
    ql.float()
    assert ql._qw is None


def test_quant_linear_paths_agree_with_the_reference(monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48)
    qw = formats.rtn4(lin.weight)
    ql = QuantLinear(qw, lin.bias, dtype=torch.float32)
    assert ql.weight.shape == (48, 96) and ql.weight.is_meta  # the shape, for code reading it
    w = formats.dequantize(qw)
    # rounding to nearest: within half a step of the original weights
    s, _ = qw.scales_offsets()
    assert ((w - lin.weight).abs() <= s.repeat_interleave(32, 1) / 2 + 1e-6).all()
    for M in (1, 6, modules.DIRECT_ROWS + 5):  # the last one de-quantises slices and F.linear
        x = torch.randn(2, M, 96)
        ref = x @ w.T + lin.bias
        assert torch.allclose(ql(x), ref, atol=1e-4), M
    monkeypatch.setattr(modules, "SLICE_BYTES", 96 * 4 * 16)  # 64 rows (the minimum) per slice
    ql2 = QuantLinear(formats.rtn4(torch.randn(200, 96)), None, dtype=torch.float32)
    x = torch.randn(30, 96)
    assert torch.allclose(ql2(x), x @ formats.dequantize(ql2.qweight).T, atol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_prefill_of_bf16_activations_runs_in_fp32_without_native_bf16(monkeypatch, native):
    """A prompt's prefill (more than DIRECT_ROWS rows, de-quantised slices): bf16 activations
    multiply in bf16 where the CPU has native bf16 matmuls, else in fp32 with the exact
    de-quantised weights, each output rounded to bf16 once."""
    monkeypatch.setattr(modules, "native_bf16", lambda: native)
    monkeypatch.setattr(modules, "SLICE_BYTES", 96 * 4 * 16)  # several slices
    g = torch.Generator().manual_seed(0)
    qw = formats.rtn4(torch.randn(200, 96, generator=g))
    bias = torch.randn(200, generator=g)
    ql = QuantLinear(qw, bias, dtype=torch.bfloat16)
    x = torch.randn(modules.DIRECT_ROWS + 3, 96, generator=g).bfloat16()
    w = formats.dequantize(qw)
    y = ql(x)
    assert y.dtype == torch.bfloat16
    if native:
        ref = torch.cat([torch.nn.functional.linear(x, w[n0:n0 + 64].bfloat16(),
                                                    bias.bfloat16()[n0:n0 + 64])
                         for n0 in range(0, 200, 64)], 1)
    else:
        ref = torch.cat([torch.nn.functional.linear(x.float(), w[n0:n0 + 64],
                                                    bias.bfloat16().float()[n0:n0 + 64])
                         for n0 in range(0, 200, 64)], 1).bfloat16()
        exact = x.double() @ w.double().T + bias.bfloat16().double()
        assert ((y.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-5).all()
    assert torch.equal(y, ref)


def test_pytorch_kernels_path(monkeypatch):
    """PyTorch's int4pack kernel: aten's convention w = (q - 8) * scale + zero, with scale and
    zero rounded to the activations' dtype; grouped 8-bit types re-quantised per channel."""
    monkeypatch.setenv("SPECCASCADE_QUANT_KERNEL", "torch")
    N, K = 32, 256
    data = random_blocks("Q4_K", N, K, seed=2)
    qw = formats.from_gguf("Q4_K", data, N, K)
    ql = QuantLinear(qw, None, dtype=torch.bfloat16)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    s, o = qw.scales_offsets()
    sb, zb = s.bfloat16().float(), (8 * s - o).bfloat16().float()
    codes = qw.unpacked_codes().float().view(N, -1, 32)
    w_bf16_scales = ((codes - 8) * sb[..., None] + zb[..., None]).view(N, K)
    ref = (x.double() @ w_bf16_scales.double().T)
    y = ql(x)
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()  # a bf16 output
    # the scale/zero rounding: a few 1e-3 of a weight's range at most
    err = (w_bf16_scales - reference("Q4_K", data, N, K)).abs().max()
    assert err <= 1e-2 * reference("Q4_K", data, N, K).abs().max()
    q6 = QuantLinear(formats.from_gguf("Q6_K", random_blocks("Q6_K", N, K), N, K), None,
                     torch.bfloat16)
    w6 = formats.dequantize(q6.qweight)
    ref6 = x.double() @ w6.double().T
    assert (q6(x).double() - ref6).abs().max() <= 3e-2 * ref6.abs().max()
    # 4-bit codes with a zero constant z (w = s (q - z) - o) take the int4 kernel too
    q4z = QuantLinear(nibble_weight(4, 32, N, K, seed=5, offsets=True), None, torch.bfloat16)
    assert q4z.z != 0
    ref4 = x.double() @ formats.dequantize(q4z.qweight).double().T
    assert q4z._torch_matmul(x) is not None and q4z._torch_state[1] == "int4"
    assert (q4z(x).double() - ref4).abs().max() <= 3e-2 * ref4.abs().max()


def test_quant_embedding_looks_up_dequantised_rows():
    kind, N, K = "Q5_0", 50, 64
    data = random_blocks(kind, N, K)
    emb = QuantEmbedding(formats.from_gguf(kind, data, N, K), dtype=torch.float32)
    ids = torch.tensor([[3, 49, 0], [3, 3, 7]])
    assert torch.equal(emb(ids), reference(kind, data, N, K)[ids])


# ---------------------------------------------------------------------------------------------
# real GGUF blocks


@pytest.fixture(scope="module")
def smollm2_gguf():
    from gguf import GGUFReader

    path = models._locate_parts(models.SOURCES[models.SMOLLM2])[0]
    return GGUFReader(str(path))


def test_real_gguf_blocks(smollm2_gguf):
    """SmolLM2's Q4_1 matrices and Q8_0 embedding (slices): exact, and through our matmul."""
    seen = set()
    for t in smollm2_gguf.tensors:
        kind = t.tensor_type.name
        if kind not in formats.SUPPORTED_GGUF or kind in seen:
            continue
        seen.add(kind)
        K, rows = int(t.shape[0]), 64
        data = np.asarray(t.data)[:rows]
        qw = formats.from_gguf(kind, data, rows, K)
        ref = reference(kind, data, rows, K)
        assert torch.equal(formats.dequantize(qw), ref), t.name
        if kernels.ours_available():
            x = torch.randn(6, K)
            y = kernels.matmul(x, qw).double()
            r = x.double() @ ref.double().T
            assert ((y - r).abs() <= 1e-6 * (x.double().abs() @ ref.double().abs().T)).all()
    assert seen == {"Q4_1", "Q8_0"}


# ---------------------------------------------------------------------------------------------
# load_model(weights=...)


@pytest.mark.parametrize("bad", ["q8", "Q4 ", "fp16", None, 4])
def test_load_model_validates_weights_first(bad):
    with pytest.raises(ValueError, match=r"weights must be one of 'bf16', 'int8', 'q4', 'q4a8'"):
        models.load_model("no/such-model-anywhere", weights=bad, progress=False)
    assert WEIGHTS == ("bf16", "int8", "q4", "q4a8")


def test_load_model_quantised_is_cpu_only():
    with pytest.raises(ValueError, match="weights='q4' runs on the CPU only"):
        models.load_model(models.SMOLLM2, weights="q4", device="meta", progress=False)


@pytest.fixture(scope="module")
def smollm2_q4():
    return models.load_model(models.SMOLLM2, weights="q4", dtype=torch.float32, progress=False)


def test_load_model_q4_keeps_the_gguf_blocks(smollm2_q4, smollm2):
    model, tok = smollm2_q4
    _, dense, _ = smollm2
    kinds = {m.kind for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert kinds == {"Q4_1", "Q8_0"}
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    # the tied LM head shares the embedding's Q8_0 blocks (no second copy)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and head.codes.data_ptr() == emb.codes.data_ptr()
    assert model.lm_head.weight.shape == (49152, 576)
    # the dense model holds the same weights rounded to bf16: logits agree closely
    ids = tok("def fibonacci(n):\n", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = dense(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_load_model_int8(smollm2):
    model, _ = models.load_model(models.SMOLLM2, weights="int8", dtype=torch.float32,
                                 progress=False)
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert lins and {m.kind for m in lins} == {"int8"}
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)  # dense
    _, dense, tok = smollm2
    ids = tok("import numpy as np\n", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = dense(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


# ---------------------------------------------------------------------------------------------
# decoding stays exact


@pytest.mark.parametrize("weights", ["q4", "int8"])
def test_quantised_greedy_is_self_consistent(weights):
    """The engine's lossless spec output equals the quantised verifier's own greedy output:
    the guarantee holds for the law the quantised model reports."""
    drafter, verifier = tiny_pair()
    qv = quantize_model(copy.deepcopy(verifier), weights)
    qd = quantize_model(copy.deepcopy(drafter), weights)
    assert not any(isinstance(m, torch.nn.Linear) for m in [*qv.modules(), *qd.modules()])
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, temperature=0, max_new_tokens=16, eos_token_id=[])
    ref = generate(None, qv, ids, method="autoregressive", **kw).new_tokens
    for d in (qd, drafter):  # a quantised drafter, or the dense one
        out = generate(d, qv, ids, rule="spec", gamma=3, **kw)
        assert out.new_tokens == ref
        assert out.stats["accepted"] > 0


def test_quantised_smollm2_greedy_is_self_consistent(smollm2_q4):
    model, tok = smollm2_q4
    drafter = models.early_exit_drafter(model, 4)
    ids = tok(["def add(a, b):\n"], return_tensors="pt").input_ids
    kw = dict(temperature=0, max_new_tokens=12, eos_token_id=[])
    ref = generate(None, model, ids, method="autoregressive", **kw).new_tokens
    out = generate(drafter, model, ids, rule="spec", gamma=4, **kw)
    assert out.new_tokens == ref


# ---------------------------------------------------------------------------------------------
# PyTorch's int8 kernel on a loaded model (speccascade bench --int8-drafter)


def test_int8_linear_matches_the_dequantized_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20, bias=True)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (20, 48)
    x = torch.randn(2, 3, 48)
    w = q.weight.float() * q.scales[:, None]
    assert torch.allclose(q(x), x @ w.T + lin.bias, atol=1e-4)
    # quantization error: at most half a step per weight
    assert bool(((w - lin.weight).abs() <= q.scales[:, None] / 2 + 1e-6).all())


def test_int8_model_is_close_and_decoding_stays_lossless():
    drafter, verifier = tiny_pair()
    q8 = int8_weight_only(copy.deepcopy(drafter))
    assert not any(isinstance(m, torch.nn.Linear) for m in q8.modules())
    ids = torch.tensor([PROMPTS[2]])
    a, b = drafter(ids).logits, q8(ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, temperature=0, max_new_tokens=16, eos_token_id=[])
    ref = generate(None, verifier, ids, method="autoregressive", **kw).new_tokens
    out = generate(q8, verifier, ids, rule="spec", gamma=3, **kw)
    assert out.new_tokens == ref  # the guarantee holds for whatever q the drafter reports
    assert out.stats["accepted"] > 0


def test_int8_rejects_a_model_without_linears():
    with pytest.raises(ValueError, match="nn.Linear"):
        int8_weight_only(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(ValueError, match="nn.Linear"):
        quantize_model(torch.nn.Sequential(torch.nn.ReLU()), "q4")


# ---------------------------------------------------------------------------------------------
# a saved folder without GGUF blocks, the CLI and the benchmark


@pytest.mark.parametrize("weights", ["q4", "int8"])
def test_folder_loads_quantised_without_the_dense_model(tmp_path, weights):
    """A Hugging Face folder (no GGUF file): its linear layers rounded while loading from a
    meta skeleton, the same modules as quantize_model makes of the loaded model."""
    _, verifier = tiny_pair()
    verifier.save_pretrained(tmp_path)
    model, tok = models.load_model(tmp_path, weights=weights, dtype=torch.float32,
                                   progress=False)
    assert tok is None
    ref = quantize_model(copy.deepcopy(verifier), weights)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    kinds = {m.kind for m in model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {"rtn4" if weights == "q4" else "int8"}
    # the weights are part of the model's name in eval runs: no resuming across weights
    from speccascade_fast.eval.harness import model_name

    assert model_name(model) == f"{tmp_path} ({weights} weights)"
    assert "weights)" not in model_name(verifier)  # dense: the name alone


def test_load_warns_where_our_kernel_runs_its_portable_loop(tmp_path, monkeypatch):
    """A CPU without AVX2 + FMA or AVX-512 runs our kernel one weight at a time: loading
    quantised weights says so (and how to take PyTorch's kernels); the others load silently."""
    import warnings

    from speccascade_fast.quant import load

    _, verifier = tiny_pair()
    verifier.save_pretrained(tmp_path)
    monkeypatch.delenv("SPECCASCADE_QUANT_KERNEL", raising=False)
    monkeypatch.setattr(load, "vector_path", lambda: "portable")
    with pytest.warns(RuntimeWarning, match="weights='int8': .*portable loop.*"
                                            "SPECCASCADE_QUANT_KERNEL=torch"):
        load.load_quantized(tmp_path, "int8", torch.float32, progress=False)
    for env, path in (("torch", "portable"), ("auto", "avx2")):
        monkeypatch.setenv("SPECCASCADE_QUANT_KERNEL", env)
        monkeypatch.setattr(load, "vector_path", lambda p=path: p)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            load.load_quantized(tmp_path, "int8", torch.float32, progress=False)
        assert not [w for w in seen if "portable loop" in str(w.message)], (env, path)


def test_generate_command_weights(capsys):
    """``speccascade generate --weights q4``: SmolLM2's GGUF blocks, an early-exit drafter; its
    greedy output is the quantised verifier's own; --weights on CUDA is a one-line error."""
    import json

    from speccascade_fast import cli

    base = ["generate", "def add(a, b):", "--verifier", models.SMOLLM2, "--weights", "q4",
            "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "8", "--json",
            "--quiet"]
    assert cli.main([*base, "--early-exit", "4", "--rule", "spec"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--method", "autoregressive"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert spec["new_tokens"] == alone["new_tokens"] and len(alone["new_tokens"]) == 8
    assert cli.main(["generate", "x", "--weights", "int8", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert ("--weights: int8 runs on the CPU only" in err or "--device" in err)
    assert err.count("\n") == 1


@needs_a8
def test_load_model_q4a8(smollm2_q4, capsys):
    """q4a8: the same GGUF blocks as q4, every linear layer with int8 activations; logits close
    to q4's; the generate command runs with it."""
    from speccascade_fast import cli

    q4, tok = smollm2_q4
    model, _ = models.load_model(models.SMOLLM2, weights="q4a8", dtype=torch.float32,
                                 progress=False)
    assert model.config.speccascade_weights == "q4a8"
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert lins and all(m.int8_activations for m in lins)
    q4_lins = {n: m for n, m in q4.named_modules() if isinstance(m, QuantLinear)}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.codes, q4_lins[n].codes) and not q4_lins[n].int8_activations
    ids = tok("def fibonacci(n):\n", return_tensors="pt").input_ids[:, :8]  # <= DIRECT_ROWS
    with torch.inference_mode():
        a, b = q4(ids).logits[0].log_softmax(-1), model(ids).logits[0].log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)  # per position, nats (about 0.014 here)
    assert 0 < kl.mean() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    argv = ["generate", "def add(a, b):", "--verifier", models.SMOLLM2, "--weights", "q4a8",
            "--early-exit", "4", "--device", "cpu", "--max-new-tokens", "4", "--quiet"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("weights", ["q4", "int8", pytest.param("q4a8", marks=needs_a8)])
def test_bench_command_weights(tmp_path, capsys, weights):
    from speccascade_fast import cli
    from speccascade_fast.bench import e2e

    tiny = ('{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, '
            '"num_attention_heads": 4, "vocab_size": 64}')
    out = tmp_path / "o"
    argv = ["bench", "--random-weights", "--overrides", tiny, "--dtype", "float32",
            "--prompts", "2", "--prompt-len", "5", "--max-new-tokens", "6", "--batch", "1",
            "--configs", "verifier,spec-greedy", "--threads", "1", "--no-hf",
            "--weights", weights]
    assert cli.main([*argv, "--out", str(out)]) == 0
    saved = e2e.from_json((out / "e2e.json").read_text())
    assert saved["settings"]["quant"] == weights
    assert saved["memory"]["peak_rss_mib"] >= saved["memory"]["rss_mib"] > 0
    assert set(e2e.greedy_agreement(saved).values()) == {"2/2"}
    assert f"Weights: {weights}. Peak resident memory" in (out / "e2e.md").read_text()
    capsys.readouterr()
    assert cli.main([*argv, "--int8-drafter"]) == 2
    assert "--int8-drafter" in capsys.readouterr().err
