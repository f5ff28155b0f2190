"""Evaluation harness: quality versus cost for every decoding method (docs/semantics.md §7).

* :func:`run_eval` runs configurations (:class:`EvalConfig`: method, rule, α, optionally a
  bonus mode or the min-p baseline) on a task's examples, one JSONL row per (configuration,
  example), resumable, at batch 1 (timed) or batched (``batch_size``: quality only), then writes
  ``summary.json``/``summary.md`` (quality with CIs, paired tests with Holm's correction,
  rejection rate, verifier calls per token, relative latency, the Table-2 figures with bootstrap
  CIs) and the quality-versus-cost plots; :func:`run_latency` measures latency at batch 1
  (several trials, shuffled order).
* :func:`calibrate` / :func:`validate` (:mod:`.calibrate`): a rule's α chosen for a quality
  target on a calibration split (a calibration file that ``generate`` takes), and its check on
  the validation split.
* :mod:`.grids`: pre-registered grids (``GRIDS``) and their plans (``plan.json``, written before
  a run starts; later runs must match it).
* Tasks (:mod:`.tasks`): ``humaneval`` (pass@1, tests in a sandboxed subprocess), ``gsm8k``
  (exact match of the final number), ``wmt14`` (English→German corpus BLEU).
* CLI: :func:`.cli.add_eval_subcommand` (``speccascade eval``) or ``python -m
  speccascade_fast.eval``.

Example::

    from speccascade_fast.eval import make_configs, run_eval
    from speccascade_fast.models import load_pair
    drafter, verifier, tok = load_pair()
    configs = make_configs(["spec_cascade"], ["token_v3"], [0.0, 0.1, 0.3, 0.5])
    summary = run_eval("gsm8k", configs, drafter=drafter, verifier=verifier, tokenizer=tok,
                       limit=50, seed=0, out_dir="runs/gsm8k", gamma=5, temperature=1.0,
                       max_new_tokens=256)
"""
from __future__ import annotations

from .calibrate import calibrate, validate
from .configs import EvalConfig, make_configs
from .grids import GRIDS, build_plan
from .harness import load_rows, run_eval, run_latency, write_summary
from .summary import best_quality_within, latency_to_reach, summarize
from .tasks import TASKS, Example, Task, get_task

__all__ = [
    "EvalConfig", "Example", "GRIDS", "TASKS", "Task", "best_quality_within", "build_plan",
    "calibrate", "get_task", "latency_to_reach", "load_rows", "make_configs", "run_eval",
    "run_latency", "summarize", "validate", "write_summary",
]
