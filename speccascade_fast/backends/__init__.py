"""Verification backends. Each mirrors :mod:`.reference` stage by stage and differs only in speed.

A backend is a module here exposing ``is_available(device) -> bool`` and ``verify(...)`` with the
reference's signature (inputs already validated and normalised by
:func:`speccascade_fast.verify`). ``auto`` picks the first available backend of ``PREFERENCE``
for the inputs' device.
"""
from __future__ import annotations

import importlib

PREFERENCE = ("triton", "cuda", "cpu", "reference")


def _module(name: str):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None


def available(device=None) -> tuple[str, ...]:
    """Backends that can run on ``device`` (a torch.device or None for CPU), fastest first."""
    out = []
    for name in PREFERENCE:
        mod = _module(name)
        if mod is not None and (name == "reference" or mod.is_available(device)):
            out.append(name)
    return tuple(out)


def resolve(name: str, device=None) -> str:
    """Backend ``name`` if it runs on ``device`` (``"auto"``: the fastest that does)."""
    names = available(device)
    if name == "auto":
        name = names[0]
    if name not in names:
        raise ValueError(
            f"backend={name!r} is not available here; choose 'auto' or one of {', '.join(names)}"
        )
    return name


def get(name: str, device=None):
    """The ``verify`` function of backend ``name`` (``"auto"``: the fastest for ``device``)."""
    return _module(resolve(name, device)).verify
