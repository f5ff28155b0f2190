"""Cost counters of one ``generate`` call and the rates derived from them (docs/semantics.md §7).

Counts (summed over the batch):

* ``tokens``          - new tokens emitted (the EOS token included, padding excluded);
* ``verifier_calls``  - forward calls of the verifier (a prefill that also scores drafts is one
  call);
* ``drafter_calls``   - forward calls of the drafter (each draft step and the ``bonus="cascade"``
  step is one call); encoder passes of encoder-decoder models are not counted;
* ``drafted``         - draft tokens sent to the verifier for verification;
* ``accepted``        - drafts the verification accepted;
* ``rejected``        - drafts it rejected (at most one per block);
* ``deferred``        - emitted positions whose ``deferred`` flag was set: the position's law came
  from the verifier (δ = 1 for prefix rules and sequential cascades; for token rules the draft lay
  outside the acceptable set A; ``spec``/``lossy``/``lossy_star`` and every ``bonus="verifier"``
  bonus position always count; ``drafter`` never does; a position the divergence budget
  verified losslessly always counts);
* ``divergence_spent`` - with a divergence budget, the total variation charged along the emitted
  positions (docs/semantics.md §9); 0.0 without one. Per sequence it is at most the budget.

``generate``'s statistics hold these summed over the batch and, under ``per_sequence``, one
dict of counts and rates per sequence.

Rates:

* ``rejection_rate``          = rejected / (accepted + rejected): the share of verified drafts that
  were rejected (a block verifies its accepted drafts plus the one rejected, if any);
* ``acceptance_rate``         = accepted / drafted;
* ``deferral_rate``           = deferred / tokens: the fraction of emitted positions that deferred;
* ``deferrals_per_token``     = verifier_calls / tokens (the paper's cost axis);
* ``tokens_per_verifier_call`` = tokens / verifier_calls (``None`` when the verifier never ran);
* ``wall_s``                  - wall-clock seconds of the whole call.
* ``prefill_s``               - (the batched ``Engine`` only) seconds of the prompts' prefill
  in both models, part of ``wall_s`` (a goodput engine that may choose plain steps feeds the
  drafter its prompts at the call's first drafting block, with what plain steps emitted
  before it: that call is counted here, and nowhere if the call never drafts);
* ``shared_prefix_tokens``    - (the batched ``Engine`` only) the length of the prefix every
  prompt of the call starts with that was fed once and copied to every row (0: none);
* ``prefix_reused_tokens``    - (the batched ``Engine`` only) how many of those the engine did
  not feed again but copied from an earlier call's shared prefix (0: none; the least over the
  models that took the prefix in this call).

Every rate is 0.0 when its denominator is 0 (except ``tokens_per_verifier_call``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    """Integer counts; ``+=`` another ``Counters`` to sum over sequences."""

    tokens: int = 0
    verifier_calls: int = 0
    drafter_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    deferred: int = 0
    blocks: int = 0
    sequences: int = 0
    sequences_deferred: int = 0
    divergence_spent: float = 0.0  # the divergence budget's charges (docs/semantics.md §9)

    def __iadd__(self, other: Counters) -> Counters:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def add_block(self, drafted: int, accepted: int) -> None:
        """One verified block: ``drafted`` drafts sent to the verifier, ``accepted`` of them
        accepted (a block rejects at most one)."""
        self.blocks += 1
        self.drafted += drafted
        self.accepted += min(accepted, drafted)
        self.rejected += int(accepted < drafted)

    def add_emitted(self, kept: list[int], deferred) -> None:
        """Emitted tokens ``kept`` and their ``deferred`` flags (the first ``len(kept)``)."""
        self.tokens += len(kept)
        self.deferred += sum(bool(d) for d in deferred[: len(kept)])

    def as_dict(self, wall_s: float = 0.0) -> dict:
        """Counts plus the derived rates (see the module docstring)."""
        d: dict = asdict(self)
        verified = self.accepted + self.rejected
        d["rejection_rate"] = _ratio(self.rejected, verified)
        d["acceptance_rate"] = _ratio(self.accepted, self.drafted)
        d["deferral_rate"] = _ratio(self.deferred, self.tokens)
        d["deferrals_per_token"] = _ratio(self.verifier_calls, self.tokens)
        d["tokens_per_verifier_call"] = (
            self.tokens / self.verifier_calls if self.verifier_calls else None
        )
        d["wall_s"] = float(wall_s)
        d["tokens_per_s"] = _ratio(self.tokens, wall_s)
        return d


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def format_line(stats: dict) -> str:
    """One human-readable line, e.g. for the CLI."""
    tpc = stats.get("tokens_per_verifier_call")
    parts = [
        f"tokens={stats['tokens']}",
        f"verifier_calls={stats['verifier_calls']}",
        f"drafter_calls={stats['drafter_calls']}",
        f"accepted={stats['accepted']}/{stats['drafted']}",
        f"rejection_rate={stats['rejection_rate']:.3f}",
        f"deferral_rate={stats['deferral_rate']:.3f}",
        f"tokens/verifier_call={'-' if tpc is None else f'{tpc:.2f}'}",
        f"wall={stats['wall_s']:.2f}s",
        f"({stats['tokens_per_s']:.1f} tok/s)",
    ]
    return " ".join(parts)
