"""WMT14 English→German (newstest2014, full): corpus BLEU with sacrebleu.

* Data: ``<data>/wmt/wmt14/newstest2014.en`` / ``.de``, line i translates line i (3,003 segments).
* Exemplars: ``k`` segments (default 4) drawn once with ``random.Random(fewshot_seed).sample``
  (seed 0) from the same test set; they are **excluded from the scored set**. The scored examples
  are the remaining segments in file order, ids ``newstest2014-<seg id>`` (1-based line number).
* Base prompt: ``Translate English to German.\\n\\n`` then ``English: …\\nGerman: …\\n\\n`` per
  exemplar, then ``English: <source>\\nGerman:``; the hypothesis is the generated text up to the
  first newline, stripped. Chat prompt: one user/assistant turn per exemplar.
* Quality: sacrebleu's default corpus BLEU (13a tokenisation, exp smoothing) over the scored
  segments. Standard error (:func:`corpus_bleu_with_se`): bootstrap over segments — resample the
  segments with replacement ``n_boot`` = 1000 times (numpy generator, seed 0), recompute corpus
  BLEU from the summed per-segment n-gram statistics (the same way sacrebleu's paired bootstrap
  does), and report the standard deviation of the replicates.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Example, Task, data_root, render_chat, require_file

INSTRUCTION = "Translate English to German."


def segment_statistics(bleu: Any, hypotheses: Sequence[str],
                       references: Sequence[str]) -> np.ndarray:
    """Per-segment sufficient statistics of corpus BLEU (``[n, k]`` integers, sacrebleu's own
    through its private API: AttributeError/TypeError if that changed). The corpus BLEU of any
    multiset of segments is :func:`score_from_statistics` of their rows' sum."""
    return np.asarray(bleu._extract_corpus_statistics(list(hypotheses), [list(references)]),
                      dtype=np.int64)


def score_from_statistics(bleu: Any, totals: Sequence[float]) -> float:
    """Corpus BLEU from summed :func:`segment_statistics`."""
    return float(bleu._compute_score_from_stats([int(x) for x in totals]).score)


def corpus_bleu_with_se(
    hypotheses: Sequence[str], references: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Corpus BLEU of ``hypotheses`` against one reference each, and its bootstrap SE.

    The SE is the standard deviation of corpus BLEU over ``n_boot`` resamples of the segments
    (with replacement, same size). ``(nan, nan)`` for no segments; SE 0 for one segment.
    """
    from sacrebleu.metrics import BLEU

    n = len(hypotheses)
    if n == 0:
        return float("nan"), float("nan")
    bleu = BLEU()
    hyps, refs = list(hypotheses), [list(references)]
    score = bleu.corpus_score(hyps, refs).score
    if n == 1 or n_boot <= 0:
        return score, 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    try:  # per-segment sufficient statistics, summed per resample (fast path)
        stats = segment_statistics(bleu, hyps, refs[0])
        reps = [score_from_statistics(bleu, stats[i].sum(0)) for i in idx]
    except (AttributeError, TypeError):  # private API changed: recompute from text
        reps = [
            BLEU().corpus_score([hyps[j] for j in i], [[refs[0][j] for j in i]]).score for i in idx
        ]
    return score, float(np.std(reps, ddof=1))


def _read_lines(path: Path) -> list[str]:
    with open(require_file(path), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


class WMT14(Task):
    """English→German newstest2014, corpus BLEU; ``k`` in-set exemplars excluded from scoring."""

    name = "wmt14"
    metric = "BLEU"
    per_example = False
    default_max_new_tokens = 128
    stop_strings = ("\n",)

    def __init__(
        self, k: int = 4, fewshot_seed: int = 0, data_dir: str | Path | None = None,
        n_boot: int = 1000,
    ):
        self.k = k
        self.fewshot_seed = fewshot_seed
        self.n_boot = n_boot
        self.data_dir = Path(data_dir) if data_dir is not None else data_root() / "wmt" / "wmt14"
        self._pairs: list[tuple[str, str]] | None = None
        self._shot_idx: list[int] | None = None
        self._bleu = None

    def _load(self) -> None:
        if self._pairs is None:
            src = _read_lines(self.data_dir / "newstest2014.en")
            ref = _read_lines(self.data_dir / "newstest2014.de")
            if len(src) != len(ref):
                raise ValueError(f"{self.data_dir}: {len(src)} sources but {len(ref)} references")
            self._pairs = list(zip(src, ref))
            self._shot_idx = random.Random(self.fewshot_seed).sample(range(len(src)), self.k)

    @property
    def exemplars(self) -> list[tuple[str, str]]:
        self._load()
        return [self._pairs[i] for i in self._shot_idx]

    def examples(self, limit: int | None = None) -> list[Example]:
        self._load()
        shots = set(self._shot_idx)
        out = [
            Example(f"newstest2014-{i + 1}", {"source": s, "reference": r})
            for i, (s, r) in enumerate(self._pairs) if i not in shots
        ]
        return out[:limit]

    def build_prompt(self, example: Example, chat: bool = False, tokenizer: Any = None) -> str:
        source = example.data["source"]
        if chat:
            messages: list[dict[str, str]] = []
            for i, (s, r) in enumerate(self.exemplars):
                head = INSTRUCTION + " Reply with the translation only.\n\n" if i == 0 else ""
                messages.append({"role": "user", "content": head + s})
                messages.append({"role": "assistant", "content": r})
            head = "" if self.exemplars else INSTRUCTION + " Reply with the translation only.\n\n"
            messages.append({"role": "user", "content": head + source})
            return render_chat(tokenizer, messages)
        shots = "".join(f"English: {s}\nGerman: {r}\n\n" for s, r in self.exemplars)
        return f"{INSTRUCTION}\n\n{shots}English: {source}\nGerman:"

    def postprocess(self, example: Example, text: str, chat: bool = False) -> str:
        # Cut first, then strip: the same text whether or not generation already ended at the
        # first newline token (a leading newline gives an empty hypothesis either way).
        return super().postprocess(example, text, chat).strip()

    def score(self, example: Example, prediction: str) -> dict[str, Any]:
        return {"hypothesis": prediction, "reference": example.data["reference"]}

    def segment_stats(self, scores: Sequence[dict[str, Any]]) -> np.ndarray:
        """Per-segment sufficient statistics of corpus BLEU, ``[n, k]`` integers: the corpus
        BLEU of any multiset of segments is :meth:`score_from_stats` of their sum (what the
        paired bootstrap of the summary resamples)."""
        return segment_statistics(self._metric(), [s["hypothesis"] for s in scores],
                                  [s["reference"] for s in scores])

    def score_from_stats(self, totals: Sequence[float]) -> float:
        """Corpus BLEU from summed :meth:`segment_stats`."""
        return score_from_statistics(self._metric(), totals)

    def _metric(self):
        """One sacrebleu ``BLEU`` (default settings) for the statistics methods."""
        if self._bleu is None:
            from sacrebleu.metrics import BLEU

            self._bleu = BLEU()
        return self._bleu

    def aggregate(self, scores: Sequence[dict[str, Any]]) -> tuple[float, float]:
        return corpus_bleu_with_se(
            [s["hypothesis"] for s in scores], [s["reference"] for s in scores],
            n_boot=self.n_boot,
        )
