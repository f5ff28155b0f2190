"""Loading a model with quantised weights, without ever holding its dense copy.

:func:`load_quantized` builds the model's skeleton on the meta device, puts a
:class:`~.modules.QuantLinear` in place of every ``nn.Linear`` (and, for ``q4`` from a GGUF file,
a :class:`~.modules.QuantEmbedding` in place of the token embedding), then reads the remaining
tensors (norms, biases, dense embeddings) one by one from the folder's safetensors files with
plain reads (no memory map, whose touched pages would count in the process's resident memory).
Peak memory is therefore about the quantised model plus one dense tensor.

Where the weights come from:

* ``q4`` for a model converted from a GGUF file (a named model or a ``.gguf`` path: the folder's
  ``speccascade.json`` records the file's sha256): the GGUF's own blocks, every quantised tensor
  kept in its block type (:mod:`.formats`), read once into ``cache_dir()/quant/<sha>/`` (the GGUF
  of a named model re-assembled from its wheels for that, by
  :func:`speccascade_fast.models.gguf_file`). The conversion checks that the blocks
  de-quantise to the bf16 folder's tensors (three rows per tensor, bit for bit), which also checks
  the name mapping and the row permutation transformers applies (llama's q/k).
  Tensors the GGUF stores unquantised (F32/F16) stay dense.
* ``q4`` for any other folder: every linear layer rounded to 4 bits (:func:`.formats.rtn4`).
* ``int8``: every linear layer in int8 with one scale per output channel, from the folder's
  (bf16) weights (:func:`.formats.int8_per_channel`); embeddings stay dense.
* ``q4a8``: the weights of ``q4``, multiplied in the manner of llama.cpp: the activations
  quantised to int8 per block of 32 inputs and integer dot products (AVX-512 VNNI or AVX2 + FMA; see
  :func:`.kernels.matmul`), up to :data:`.modules.DIRECT_ROWS` rows (a prompt's prefill takes
  the de-quantised path of ``q4``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import struct
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

from .formats import (
    SUPPORTED_GGUF,
    TENSOR_FIELDS,
    QuantizedWeight,
    dequantize,
    from_gguf,
    int8_per_channel,
    rtn4,
)
from .kernels import check_int8_activations, kernel_choice, vector_path
from .modules import QuantEmbedding, QuantLinear

WEIGHTS = ("bf16", "int8", "q4", "q4a8")
_FOUR_BIT = ("q4", "q4a8")  # the GGUF's blocks (or 4-bit rounding); q4a8: int8 activations
_QFORMAT = 2  # bump when the layout of cache_dir()/quant/ changes
_MARKER = "quant.json"


def check_weights(weights) -> str:
    """``weights`` lower-cased if it is one of :data:`WEIGHTS`, else a ValueError naming it."""
    w = weights.lower() if isinstance(weights, str) else weights
    if w not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got "
                         f"{weights!r}")
    return w


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[speccascade] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# safetensors without a memory map

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
              "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
              "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


class TensorFiles:
    """The tensors of a folder's ``model.safetensors`` (or its shards, through
    ``model.safetensors.index.json``), each read on demand with ``pread``."""

    def __init__(self, folder: pathlib.Path):
        folder = pathlib.Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{folder} has no model.safetensors")
        self.entries: dict[str, tuple[pathlib.Path, int, str, list[int], int]] = {}
        for name in files:
            path = folder / name
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for key, e in header.items():
                if key == "__metadata__":
                    continue
                start, end = e["data_offsets"]
                self.entries[key] = (path, 8 + n + start, e["dtype"], e["shape"], end - start)
        self.metadata = header.get("__metadata__", {}) if files else {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> torch.Tensor:
        path, offset, dtype, shape, nbytes = self.entries[key]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {dtype}")
        out = torch.empty(shape, dtype=_ST_DTYPES[dtype])
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else np.empty(0, np.uint8)
        if buf.nbytes != nbytes:
            raise ValueError(f"{path}: tensor {key} has {nbytes} bytes, expected {buf.nbytes}")
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
                if got <= 0:
                    raise ValueError(f"{path} is truncated (tensor {key})")
                done += got
        finally:
            os.close(fd)
        return out


def save_quantized(path: pathlib.Path, weights: dict[str, QuantizedWeight], extra: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v for name, qw in weights.items() for k, v in qw.tensors().items()}
    meta = {"weights": {name: qw.meta() for name, qw in weights.items()}, **extra}
    save_file(tensors, str(path), metadata={"quant": json.dumps(meta)})


def read_quantized(path: pathlib.Path) -> tuple[dict[str, QuantizedWeight], dict]:
    files = TensorFiles.__new__(TensorFiles)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    files.entries = {k: (path, 8 + n + e["data_offsets"][0], e["dtype"], e["shape"],
                         e["data_offsets"][1] - e["data_offsets"][0])
                     for k, e in header.items() if k != "__metadata__"}
    meta = json.loads(header["__metadata__"]["quant"])
    out = {}
    for name, m in meta.pop("weights").items():
        fields = {k: files.get(f"{name}.{k}") for k in TENSOR_FIELDS
                  if f"{name}.{k}" in files.entries}
        out[name] = QuantizedWeight(m["kind"], m["bits"], m["G"], m["gps"], m["N"], m["K"],
                                    **fields, z=m.get("z", 0))
    return out, meta


# ---------------------------------------------------------------------------------------------
# GGUF blocks, converted once into cache_dir()/quant/


def gguf_source(folder: pathlib.Path) -> dict | None:
    """The GGUF provenance a converted folder records (``speccascade.json``'s source), if any."""
    try:
        meta = json.loads((pathlib.Path(folder) / "speccascade.json").read_text())
    except (OSError, ValueError):
        return None
    src = meta.get("source") or {}
    return src if isinstance(src.get("sha256"), str) else None


def _row_permutation(processor, name: str, N: int, mapping: dict) -> np.ndarray | None:
    """The permutation of rows transformers' GGUF tensor processor applies to tensor ``name``
    (None: the identity; a ValueError when it does more than permute rows)."""
    probe = np.arange(N, dtype=np.float64).reshape(N, 1)
    result = processor.process(weights=probe, name=name, tensor_key_mapping=mapping,
                               parsed_parameters={"config": processor.config, "tensors": {}})
    out = np.asarray(result.weights)
    if result.name != name or out.shape != (N, 1) or sorted(out[:, 0]) != list(range(N)):
        raise ValueError(f"transformers' GGUF processor does more than permute the rows of {name}")
    perm = out[:, 0].astype(np.int64)
    return None if (perm == np.arange(N)).all() else perm


def convert_gguf(gguf: pathlib.Path, folder: pathlib.Path, progress: bool) \
        -> dict[str, QuantizedWeight]:
    """Every quantised matrix of ``gguf`` that is a linear layer's weight or the token embedding
    of the model in ``folder``, by module name, in its GGUF block type; checked against the
    folder's de-quantised tensors."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linear = {n for n, m in skeleton.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    reader = GGUFReader(str(gguf))
    arch = read_field(reader, "general.architecture")[0]
    # the processors read the head counts from the config (HF names, as the folder's)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    dense = TensorFiles(folder)
    out: dict[str, QuantizedWeight] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        hf = mapping.get(t.name)
        if hf is None or not hf.endswith(".weight") or kind not in SUPPORTED_GGUF:
            continue
        module = hf[: -len(".weight")]
        if module not in linear or len(t.shape) != 2:
            continue
        K, N = int(t.shape[0]), int(t.shape[1])
        data = np.asarray(t.data).reshape(N, -1)
        step = 16384
        parts = [from_gguf(kind, data[i:i + step], min(step, N - i), K) for i in range(0, N, step)]
        qw = parts[0] if len(parts) == 1 else dataclasses.replace(
            parts[0], N=N, **{k: torch.cat([getattr(p, k) for p in parts])
                              for k in parts[0].tensors()})
        perm = _row_permutation(processor, t.name, N, mapping)
        if perm is not None:
            qw = qw.rows(torch.from_numpy(perm))
        if hf in dense:  # the de-quantised folder holds the same weights, rounded to its dtype
            ref = dense.get(hf)
            rows = torch.tensor(sorted({0, N // 2, N - 1}))
            mine = dequantize(qw.rows(rows)).to(ref.dtype)
            if tuple(ref.shape) != (N, K) or not torch.equal(mine, ref[rows]):
                raise RuntimeError(f"{gguf.name}: tensor {t.name} ({kind}) does not de-quantise "
                                   f"to {hf} of {folder}: the GGUF-to-model mapping is wrong")
        out[module] = qw
    if not out:
        raise ValueError(f"{gguf.name}: no quantised tensor of a supported type ("
                         f"{', '.join(SUPPORTED_GGUF)}) maps onto a linear layer")
    return out


def gguf_weights(folder: pathlib.Path, cache: pathlib.Path, gguf_file, progress: bool) \
        -> dict[str, QuantizedWeight] | None:
    """The GGUF blocks of the model in ``folder`` (see :func:`convert_gguf`), from
    ``cache/quant/`` (converted there on first use); None when the folder was not converted from
    a GGUF file. ``gguf_file(source, scratch, progress)``: a context manager giving the path of
    the GGUF file that ``source`` (the folder's provenance record) names, made in ``scratch``
    if need be (:func:`speccascade_fast.models.gguf_file`)."""
    src = gguf_source(folder)
    if src is None:
        return None
    out = cache / "quant" / f"{src['sha256'][:24]}-v{_QFORMAT}"
    path = out / "gguf-blocks.safetensors"
    if (out / _MARKER).is_file() and path.is_file():
        try:
            return read_quantized(path)[0]
        except (OSError, ValueError, KeyError) as e:
            _say(progress, f"{path} cannot be read ({e}); converting again")
    t0 = time.perf_counter()
    _say(progress, f"reading the GGUF blocks of {folder.name} into {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        with gguf_file(src, tmp, progress) as gguf:
            weights = convert_gguf(gguf, folder, progress)
        save_quantized(tmp / path.name, weights, {"source": src})
        kinds: dict[str, int] = {}
        for qw in weights.values():
            kinds[qw.kind] = kinds.get(qw.kind, 0) + qw.N * qw.K
        (tmp / _MARKER).write_text(json.dumps(
            {"format": _QFORMAT, "source": src, "weights_by_kind": kinds,
             "converted_in_s": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"GGUF blocks read in {time.perf_counter() - t0:.1f} s")
    return weights


# ---------------------------------------------------------------------------------------------
# the model


def _set(model: nn.Module, name: str, value, *, param: bool) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if param:
        parent._parameters[child] = nn.Parameter(value, requires_grad=False)
    else:
        parent._buffers[child] = value


def load_quantized(folder: pathlib.Path, weights: str, dtype: torch.dtype = torch.bfloat16,
                   progress: bool = True, *, cache: pathlib.Path | None = None, gguf_file=None):
    """The model in ``folder`` with ``weights`` (``"int8"`` or ``"q4"``), in eval mode on the
    CPU, activations in ``dtype`` (see the module docstring). ``q4`` reads the GGUF blocks (see
    :func:`gguf_weights`) when ``cache`` and ``gguf_file`` are given (load_model gives them),
    else rounds the dense weights to 4 bits."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    weights = check_weights(weights)
    if weights == "bf16":
        raise ValueError("load_quantized: weights='bf16' is the dense model (load_model)")
    if weights == "q4a8":
        check_int8_activations()
    elif kernel_choice() != "torch" and vector_path() == "portable":
        warnings.warn(f"weights={weights!r}: this CPU has neither AVX2 with FMA nor AVX-512, so "
                      f"our quantised kernel runs its portable loop, many times slower than "
                      f"bf16; SPECCASCADE_QUANT_KERNEL=torch takes PyTorch's kernels (4-bit "
                      f"scales rounded to the activations' dtype, 5- to 8-bit blocks re-quantised "
                      f"per channel)", RuntimeWarning, stacklevel=2)
    folder = pathlib.Path(folder)
    try:
        files = TensorFiles(folder)
    except FileNotFoundError:  # weights in another format (pytorch_model.bin): load, then round
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        return quantize_linears(model, weights)
    qcache = None
    if weights in _FOUR_BIT and cache is not None and gguf_file is not None:
        qcache = gguf_weights(folder, cache, gguf_file, progress)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})

    def dense(key: str) -> torch.Tensor:
        if key not in files and key in tied:
            key = tied[key]
        return files.get(key)

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            qw = (qcache or {}).get(name)
            if qw is None and qcache is not None and f"{name}.weight" in tied:
                qw = qcache.get(tied[f"{name}.weight"][: -len(".weight")])
            if qw is None:
                if mod.in_features % 32:  # no quantised layout for it: dense
                    continue
                w = dense(f"{name}.weight")
                qw = int8_per_channel(w) if weights == "int8" else rtn4(w)
                del w
            bias = dense(f"{name}.bias").to(dtype) if mod.bias is not None else None
            _replace(model, name, QuantLinear(qw, bias, dtype,
                                              int8_activations=weights == "q4a8"))
            _trim()
        elif isinstance(mod, nn.Embedding) and qcache is not None and name in qcache:
            _replace(model, name, QuantEmbedding(qcache[name], dtype, mod.padding_idx))
    del qcache
    persistent = set(model.state_dict())
    for pname, p in list(model.named_parameters()):
        if p.is_meta:
            _set(model, pname, dense(pname).to(dtype if p.is_floating_point() else p.dtype),
                 param=True)
    for bname, b in list(model.named_buffers()):
        if b.is_meta and bname in persistent:
            _set(model, bname, dense(bname).to(b.dtype), param=False)
    # non-persistent buffers (rotary frequencies): made empty, then set by the model's own init
    for mod in list(model.modules()):
        metas = [k for k, b in mod._buffers.items() if b is not None and b.is_meta]
        if metas and not list(mod.parameters(recurse=False)):  # (init would reset parameters)
            for k in metas:
                mod._buffers[k] = torch.empty_like(mod._buffers[k], device="cpu")
            with torch.no_grad():
                model._init_weights(mod)
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray:
        raise TypeError(f"{folder}: {type(model).__name__} has tensors that could not be "
                        f"loaded quantised: {stray[:5]}")
    _trim()
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    model.config.name_or_path = str(folder)
    model.config.speccascade_weights = weights  # read by model_facts.quantised_weights
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.eval()
    return model


def quantize_linears(model: nn.Module, weights: str) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` of a loaded CPU model whose input size is a
    multiple of 32 by a :class:`QuantLinear`: ``"int8"`` per output channel, ``"q4"`` 4-bit
    round-to-nearest in groups of 32, ``"q4a8"`` the same with int8 activations (``"bf16"``:
    unchanged). Returns the model."""
    weights = check_weights(weights)
    if weights == "bf16":
        return model
    if weights == "q4a8":
        check_int8_activations()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to quantise")
    for name, linear in targets:
        if linear.in_features % 32:
            continue
        w = linear.weight.detach()
        qw = int8_per_channel(w) if weights == "int8" else rtn4(w)
        _replace(model, name, QuantLinear(qw, linear.bias, dtype=w.dtype,
                                          int8_activations=weights == "q4a8"))
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    return model


def _trim() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): the dense tensors
    read and dropped one by one would otherwise stay in the resident set as free heap."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


__all__ = ["TensorFiles", "WEIGHTS", "check_weights", "convert_gguf", "gguf_source",
           "gguf_weights", "load_quantized", "quantize_linears", "read_quantized",
           "save_quantized"]
