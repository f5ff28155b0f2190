"""What every evaluation task provides: examples, a prompt builder, stop strings and a scorer.

A task is a small object with this interface (``Task`` below is the base class; the harness only
relies on the attributes and methods listed here, so a test may pass any object that has them):

* ``name`` (str), ``metric`` (str, e.g. ``"pass@1"``), ``default_max_new_tokens`` (int),
  ``stop_strings`` (tuple of str): the generated text is cut at the first occurrence of any of them.
* ``examples(limit) -> list[Example]``: the scored examples, in a fixed order; ``limit`` keeps the
  first ``limit`` of them (``None``: all).
* ``build_prompt(example, chat, tokenizer) -> str``: the exact text given to the tokenizer. With
  ``chat=True`` the task builds a message list and renders it with the tokenizer's chat template.
* ``postprocess(example, text, chat) -> str``: the prediction extracted from the decoded new tokens
  (the default cuts ``text`` at the first stop string; a chat-mode task may extract a code block
  first).
* ``score(example, prediction) -> dict``: the per-example fields written to the JSONL row. It must
  contain ``"score"`` (a float; 0/1 for pass@1 and exact match) or, for corpus-level metrics, the
  inputs of the corpus metric (``"hypothesis"``/``"reference"`` for BLEU).
* ``aggregate(scores) -> (quality, standard_error)``: the quality of one configuration from the
  dicts ``score`` returned for its examples (the ``"scoring"`` field of its JSONL rows). The
  default is the mean of ``"score"`` with the standard error ``std(ddof=1) / sqrt(n)``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_ENV = "SPECCASCADE_DATA"


def data_root() -> Path:
    """The folder holding the evaluation data (``gsm8k/``, ``wmt/``).

    ``$SPECCASCADE_DATA`` when set, else ``<repo>/../shared/data`` where ``<repo>`` is the checkout
    that contains this package.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "data"


def require_file(path: Path) -> Path:
    """``path`` if it exists, else a FileNotFoundError that says how to point at the data."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; set ${DATA_ENV} to the folder that holds gsm8k/ and wmt/ "
            f"(default: <repo>/../shared/data)"
        )
    return path


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop_strings:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render ``messages`` with the tokenizer's chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``std(ddof=1) / sqrt(n)`` (SE 0 for n = 1, NaN for n = 0)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


@dataclass
class Example:
    """One scored item: a stable ``id``, the task's raw ``data`` (question, source, tests …)."""

    id: str
    data: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class with the defaults described in the module docstring."""

    name = "task"
    metric = "score"
    #: the quality is the mean of the per-example ``score`` (so configurations can be compared
    #: example by example); False for corpus-level metrics such as BLEU
    per_example = True
    default_max_new_tokens = 256
    stop_strings: tuple[str, ...] = ()

    def examples(self, limit: int | None = None) -> list[Example]:
        raise NotImplementedError

    def build_prompt(self, example: Example, chat: bool = False, tokenizer: Any = None) -> str:
        raise NotImplementedError

    def postprocess(self, example: Example, text: str, chat: bool = False) -> str:
        return truncate_at_stop(text, self.stop_strings)

    def score(self, example: Example, prediction: str) -> dict[str, Any]:
        raise NotImplementedError

    def aggregate(self, scores: Sequence[dict[str, Any]]) -> tuple[float, float]:
        return mean_and_se([float(s["score"]) for s in scores])
