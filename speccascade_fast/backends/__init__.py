"""Verification backends. Each mirrors :mod:`.reference` stage by stage and differs only in speed.

``available()`` lists what runs here; ``auto`` picks the first available of ``PREFERENCE``.
"""
from __future__ import annotations

from . import reference

_BACKENDS = {"reference": reference.verify}
PREFERENCE = ("reference",)


def available() -> tuple[str, ...]:
    return tuple(name for name in PREFERENCE if name in _BACKENDS)


def get(name: str, device=None):
    if name == "auto":
        name = available()[0]
    if name not in _BACKENDS:
        raise ValueError(
            f"backend={name!r} is not available here; choose 'auto' or one of {', '.join(available())}"
        )
    return _BACKENDS[name]
