"""Evaluation tasks, one module each: prompt builder, stop strings, scorer (see ``base``)."""
from __future__ import annotations

from typing import Any

from .base import Example, Task, data_root, truncate_at_stop
from .gsm8k import GSM8K
from .humaneval import HumanEval
from .wmt14 import WMT14

TASKS: dict[str, type[Task]] = {"humaneval": HumanEval, "gsm8k": GSM8K, "wmt14": WMT14}


def get_task(task: str | Task, **kwargs: Any) -> Task:
    """A task object from its name (``humaneval``, ``gsm8k``, ``wmt14``) or the object itself."""
    if not isinstance(task, str):
        return task
    try:
        cls = TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}") from None
    return cls(**kwargs)


__all__ = ["Example", "GSM8K", "HumanEval", "TASKS", "Task", "WMT14", "data_root", "get_task",
           "truncate_at_stop"]
