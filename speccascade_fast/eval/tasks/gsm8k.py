"""GSM8K (Cobbe et al. 2021): exact match on the final number, k-shot chain of thought.

* Scored set: ``<data>/gsm8k/test.jsonl`` in file order (ids ``gsm8k-test-<line index>``).
* Exemplars: ``k`` problems drawn once from ``<data>/gsm8k/train.jsonl`` with
  ``random.Random(fewshot_seed).sample`` (default k = 8, seed 0), never scored. Their worked
  answers lose the calculator annotations ``<<expr=value>>`` and end "The answer is N." in place of
  the final ``#### N`` line.
* Base prompt: ``Question: …\\nAnswer: …\\n\\n`` per exemplar, then ``Question: …\\nAnswer:``.
  Chat prompt: one user/assistant turn per exemplar, then the question as the last user turn.
* Stop strings: ``"\\n\\nQuestion:"``, ``"\\nQuestion:"``, ``"\\n\\n\\n"``.
* Extraction (:func:`extract_answer`): the number after the last "The answer is", else after the
  last ``####``, else the last number in the text; commas, ``$`` and a trailing period dropped.
  Two answers match when they are equal as decimal numbers (``"18" == "18.00"``).
"""
from __future__ import annotations

import json
import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .base import Example, Task, data_root, render_chat, require_file

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer is[:\s]*\**\s*(" + _NUMBER + ")", re.I)
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
_CALC = re.compile(r"<<[^>]*>>")


def _clean_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    return s


def normalise_number(s: str | None) -> str | None:
    """Canonical decimal text of ``s`` (``"1,000.50" -> "1000.5"``), ``None`` if not a number."""
    if s is None:
        return None
    try:
        d = Decimal(_clean_number(s))
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a model's ``text`` (normalised), ``None`` if there is none."""
    for pattern in (_ANSWER_IS, _HASHES):
        hits = pattern.findall(text)
        if hits:
            return normalise_number(hits[-1])
    hits = _ANY_NUMBER.findall(text)
    return normalise_number(hits[-1]) if hits else None


def reference_answer(answer: str) -> str:
    """The normalised number after ``####`` in a GSM8K ``answer`` field."""
    return normalise_number(answer.split("####")[-1].strip())


def exemplar_solution(answer: str) -> str:
    """A training ``answer`` as shown in the prompt: no ``<<…>>``, ending "The answer is N."."""
    body, final = answer.split("####")
    return _CALC.sub("", body).strip() + f"\nThe answer is {final.strip()}."


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(require_file(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class GSM8K(Task):
    """Exact match of the final number; ``k`` exemplars from the training split."""

    name = "gsm8k"
    metric = "accuracy"
    default_max_new_tokens = 256
    stop_strings = ("\n\nQuestion:", "\nQuestion:", "\n\n\n")

    def __init__(self, k: int = 8, fewshot_seed: int = 0, data_dir: str | Path | None = None):
        self.k = k
        self.fewshot_seed = fewshot_seed
        self.data_dir = Path(data_dir) if data_dir is not None else data_root() / "gsm8k"
        self._exemplars: list[dict[str, Any]] | None = None

    @property
    def exemplars(self) -> list[dict[str, Any]]:
        if self._exemplars is None:
            train = _read_jsonl(self.data_dir / "train.jsonl")
            idx = random.Random(self.fewshot_seed).sample(range(len(train)), self.k)
            self._exemplars = [train[i] for i in idx]
        return self._exemplars

    def examples(self, limit: int | None = None) -> list[Example]:
        test = _read_jsonl(self.data_dir / "test.jsonl")
        return [Example(f"gsm8k-test-{i}", row) for i, row in enumerate(test[:limit])]

    def build_prompt(self, example: Example, chat: bool = False, tokenizer: Any = None) -> str:
        question = example.data["question"].strip()
        if chat:
            messages: list[dict[str, str]] = []
            for ex in self.exemplars:
                messages.append({"role": "user", "content": ex["question"].strip()})
                messages.append({"role": "assistant", "content": exemplar_solution(ex["answer"])})
            messages.append({"role": "user", "content": question})
            return render_chat(tokenizer, messages)
        shots = "".join(
            f"Question: {ex['question'].strip()}\nAnswer: {exemplar_solution(ex['answer'])}\n\n"
            for ex in self.exemplars
        )
        return f"{shots}Question: {question}\nAnswer:"

    def score(self, example: Example, prediction: str) -> dict[str, Any]:
        pred = extract_answer(prediction)
        ref = reference_answer(example.data["answer"])
        return {"score": float(pred is not None and pred == ref), "extracted": pred,
                "reference": ref}
