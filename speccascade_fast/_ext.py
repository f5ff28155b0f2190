"""The optional compiled extension ``speccascade_fast._C``.

``load()`` returns the module, or None when it was not built (no compiler at install time,
``SPECCASCADE_NO_EXT=1``) or does not import; callers then use the torch reference paths.
Importing this module never raises.
"""
from __future__ import annotations

from types import ModuleType

_C: ModuleType | None = None
#: Why ``_C`` is unavailable (the import error's text), or None when it loaded.
IMPORT_ERROR: str | None = None

try:
    import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

    from . import _C  # type: ignore[attr-defined, no-redef]
except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
    _C = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: The CPU kernels (``_C.sample_cpu``, ...) are available.
HAS_CPU_EXT: bool = _C is not None
#: The CUDA kernels (``_C.sample_cuda``, ...) are available (a build against CUDA torch).
HAS_CUDA_EXT: bool = _C is not None and bool(getattr(_C, "with_cuda", False))


def load() -> ModuleType | None:
    """The compiled ``speccascade_fast._C`` module, or None if it is unavailable."""
    return _C
