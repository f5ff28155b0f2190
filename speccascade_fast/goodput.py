"""Goodput-adaptive speculation: each block's gamma, chosen to maximise expected tokens per second.

Before every block the :class:`~speccascade_fast.engine.Engine` asks :class:`Goodput` for the
number of drafts ``gamma`` in ``{g_min, ..., gamma_max}``. With per-draft acceptance ``a_b`` of
row b (the i.i.d. model of Leviathan et al.), a block of gamma drafts emits in expectation

    E_b(gamma) = 1 + a_b + a_b^2 + ... + a_b^gamma = (1 - a_b^(gamma + 1)) / (1 - a_b)

tokens (gamma = 0: one verifier step, one token). The controller picks the gamma that maximises
``sum_b E_b(gamma) / t(gamma)``, where ``t(gamma)`` is the wall time of such a block at the
current batch size, measured online:

* ``a_b`` is what the engine already counts for the row: ``(accepted + 1) / (accepted +
  rejected + 2)`` (a Beta(1, 1) prior on the per-draft acceptance);
* ``t`` is an exponential moving average of the blocks run at each (batch size, gamma); a gamma
  not yet run at this batch size is predicted from a straight line ``t = c0 + c1 gamma`` through
  the measured ones (the verifier call and a drafter step per draft), and where this batch size
  has too few points, from the nearest batch size that has them (rows leaving the batch do not
  restart the exploration). Until two values of gamma >= 1 are measured, the controller
  explores: gamma_max first, then 1, then (if allowed) 0. The first block at a (batch size,
  gamma) may carry one-time costs (new shapes), so the second replaces it rather than being
  averaged with it.

Plain verifier steps (gamma = 0) teach the controller nothing about acceptance and leave the
times of the other gammas as they were, so a choice of 0 made on a stale or unlucky estimate
would stand forever. After ``PROBE_AFTER`` blocks in a row at gamma = 0 the next block is a
probe: the best gamma >= 1 by the same model, which measures its time and the rows' acceptance
again. A probe costs a drafting block and the drafter's catch-up where plain steps are the
better choice (at large batches), so each probe after which the model still prefers gamma = 0
doubles the wait for the next one (up to ``PROBE_MAX`` blocks); one that turns the choice back
to drafting resets it. A probe also waits until the catch-up it needs is predicted to cost at
most ``PROBE_SHARE`` of the plain steps' predicted time (their count in this call since the last
drafting block times a plain step's measured time), but not past ``PROBE_MAX`` plain steps.

The catch-up (feeding the lagging drafter every token it missed, in one call) is a switching
cost, not part of a block's time: the engine stops the clock for it and times it on its own
(:meth:`Goodput.catch_up`: a deferred prefill by its seconds per token, padding included; a
catch-up after plain steps, a call of a few tokens that is mostly fixed cost, by its seconds;
moving averages). While the drafter lags, a block of gamma >= 1 is
charged the predicted catch-up spread over the tokens the call still has to emit (its share for
the tokens the block is expected to emit): drafting has to pay back the switch within the call.

Where the controller may choose gamma = 0, the engine defers the drafter's prefill to a call's
first drafting block (the catch-up feeds it then; its time is still reported as prefill): a
call whose blocks are all plain steps, as at batch sizes where drafting does not pay, never
runs the drafter. An engine keeps its controller across calls, so from its second call on at a
batch size the choice starts from measured times, without exploring again.

``g_min`` is 0 (plain verifier decoding) when a block with no draft emits the rule's law at that
position: always for lossless ``spec`` and with ``bonus="verifier"`` (a zero-draft block is its
bonus position, pT). Under ``bonus="cascade"`` with another rule the token would need the
drafter's q there anyway, so g_min is 1.

Two ways to predict ``a_b`` (``gamma_policy``): ``"goodput"`` uses the counts above, which
average over everything the row has verified so far; ``"goodput_confidence"`` uses
:class:`ConfidenceAcceptance`, which reads the drafter's own confidence (its largest
probability at each verified draft, the Chow score) over the row's last blocks and maps it to an
acceptance through a calibration table learned online from every row's verified positions, so the
prediction follows the text (drafts copying a docstring, then new code) rather than the row's
history. Both predictors are scored on every block's outcome (:class:`AcceptanceLog`; the
statistics' ``acceptance_log_loss``), so a run says which predicted better.

The choice only decides where blocks end, never how a token is drawn, so the law of every emitted
token is the rule's. The chosen gammas are recorded in the statistics (``gammas``); a run with a
fixed schedule (``gamma_policy`` a callable) is deterministic and batch-invariant.
"""
from __future__ import annotations

import bisect
import math

#: weight of the newest block time in the moving average
EMA = 0.3
#: plain verifier steps in a row after which the next block drafts again (a probe) ...
PROBE_AFTER = 8
#: ... doubled after each probe that did not change the choice, up to this many
PROBE_MAX = 256
#: and a probe waits until the drafter's predicted catch-up costs at most this share of the
#: plain steps' time since the last drafting block
PROBE_SHARE = 0.05
#: upper edges of the confidence bins the calibration counts in (the drafter's largest
#: probability sits mostly near 1)
EDGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
#: weight of the newest verified position in a row's confidence feature
CONFIDENCE_EMA = 0.5
#: pseudo-counts, at the pooled acceptance, in each calibration bin
PRIOR = 2.0
#: predicted acceptances are kept in [EPS, 1 - EPS] when scored
EPS = 1e-4


class Goodput:
    """The goodput controller of one :class:`~speccascade_fast.engine.Engine` (see the module
    docstring). ``choose`` before a block, ``observe`` after it."""

    def __init__(self, gamma_max: int, allow_zero: bool):
        self.gamma_max = gamma_max
        self.g_min = 0 if allow_zero else 1
        self.times: dict[tuple[int, int], float] = {}  # (batch size, gamma) -> seconds
        self.seen: dict[tuple[int, int], int] = {}  # (batch size, gamma) -> blocks observed
        self.zeros = 0  # gamma-0 blocks chosen in a row
        self.probe_after = PROBE_AFTER  # gamma-0 blocks in a row before the next probe
        self.probed = False  # whether the last block was a probe
        #: seconds per token of a deferred drafter prefill, and seconds of a catch-up after
        #: plain steps (moving averages; None until one is timed)
        self.prefill_rate: float | None = None
        self.catch_up_s: float | None = None

    def observe(self, batch: int, gamma: int, seconds: float) -> None:
        key = (batch, gamma)
        n = self.seen[key] = self.seen.get(key, 0) + 1
        self.times[key] = seconds if n <= 2 else _ema(self.times[key], seconds)

    def observe_catch_up(self, tokens: int, seconds: float, prefill: bool = False) -> None:
        """The lagging drafter was fed ``tokens`` tokens (padding included) in ``seconds``:
        its deferred prefill (``prefill``), or a catch-up after plain steps."""
        if tokens <= 0:
            return
        if prefill:
            self.prefill_rate = _ema(self.prefill_rate, seconds / tokens)
        else:
            self.catch_up_s = _ema(self.catch_up_s, seconds)

    def new_call(self) -> None:
        """A new ``generate`` call: the plain steps counted towards a probe were the last
        call's (its drafter's lag is gone), so the count restarts."""
        self.zeros = 0

    def catch_up(self, lag: int, prefill: bool = False) -> float:
        """Predicted seconds to feed the drafter ``lag`` tokens: a deferred prefill at the
        prefills' rate; a catch-up after plain steps costs what the last ones did (a call of a
        few tokens is mostly its fixed cost), or at the prefills' rate if that is more. 0 where
        nothing was timed yet."""
        if lag <= 0:
            return 0.0
        by_rate = lag * self.prefill_rate if self.prefill_rate is not None else 0.0
        return by_rate if prefill else max(by_rate, self.catch_up_s or 0.0)

    def choose(self, batch: int, acceptance: list[float], g_min: int | None = None,
               catch_up: float = 0.0, remaining: float | None = None) -> int:
        """The gamma for the next block of ``batch`` rows whose per-draft acceptance estimates
        are ``acceptance``; at least ``g_min`` (default: the controller's) for this block.
        ``catch_up``: predicted seconds to feed the lagging drafter before it can draft (after
        plain steps, or its deferred prefill: :meth:`catch_up`); ``remaining``: tokens each
        row may still emit (its budget; EOS may end it sooner), on average. Drafting then pays
        the catch-up once for the rest of the call, so a block of gamma >= 1 is charged its
        share, ``catch_up * E / remaining`` for the ``E`` tokens per row it is expected to
        emit."""
        g_min = self.g_min if g_min is None else max(g_min, self.g_min)
        measured = {g for (_, g) in self.times}
        for g in (self.gamma_max, 1, 0):  # exploration: enough points for the line
            if g >= g_min and g not in measured:
                if g >= 1 and len(measured - {0}) >= 2:
                    continue
                return g
        share = catch_up / remaining if remaining else 0.0  # seconds per emitted token per row

        def goodput(g):
            tokens = self.expected_tokens(acceptance, g)
            return tokens / (self.cost(batch, g) + (share * tokens / batch if g else 0.0))

        probe = g_min == 0 and self.zeros >= self.probe_after and (
            catch_up <= PROBE_SHARE * self.zeros * self.cost(batch, 0) or self.zeros >= PROBE_MAX)
        best = max(range(1 if probe else g_min, self.gamma_max + 1),
                   key=lambda g: (goodput(g), -g))
        if self.probed:  # the model's choice with the probe's measurements in
            self.probe_after = (PROBE_AFTER if best >= 1
                                else min(2 * self.probe_after, PROBE_MAX))
        self.probed = probe
        self.zeros = self.zeros + 1 if best == 0 else 0
        return best

    @staticmethod
    def expected_tokens(acceptance: list[float], gamma: int) -> float:
        """``sum_b E_b(gamma)``: the expected tokens a block of gamma drafts emits."""
        return sum(gamma + 1 if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)
                   for a in acceptance)

    def cost(self, batch: int, gamma: int) -> float:
        """Seconds of a block of gamma drafts at this batch size: measured, else from the line
        through the measured gammas >= 1, else from the nearest batch size that can say."""
        for b in sorted({b for b, _ in self.times}, key=lambda b: (abs(b - batch), -b)):
            t = self._cost_at(b, gamma)
            if t is not None:
                return t
        return math.inf

    def _cost_at(self, batch: int, gamma: int) -> float | None:
        t = self.times.get((batch, gamma))
        if t is not None:
            return t
        pts = [(g, s) for (b, g), s in self.times.items() if b == batch and g >= 1]
        if len(pts) < 2:
            return None
        n = len(pts)
        mg = sum(g for g, _ in pts) / n
        ms = sum(s for _, s in pts) / n
        var = sum((g - mg) ** 2 for g, _ in pts)
        slope = sum((g - mg) * (s - ms) for g, s in pts) / var
        return max(ms + slope * (gamma - mg), 1e-9)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


def acceptance(accepted: int, rejected: int) -> float:
    """A row's per-draft acceptance estimate from its counts (Beta(1, 1) prior)."""
    return (accepted + 1) / (accepted + rejected + 2)


def verified_positions(drafted: int, accepted: int) -> int:
    """How many of a block's draft positions the verifier decided: the accepted ones and the
    first rejected one (drafts after it were conditioned on a token that was not kept)."""
    return min(accepted + 1, drafted)


class ConfidenceAcceptance:
    """Per-row acceptance predicted from the drafter's confidence (``gamma_policy=
    "goodput_confidence"``).

    A row's feature is an exponential moving average (weight :data:`CONFIDENCE_EMA` per
    position) of the drafter's largest probability at the row's verified draft positions. The
    calibration table counts, per bin of the feature (:data:`EDGES`), the verified positions of
    the blocks that followed it and how many were accepted, pooled over rows and kept across
    calls (like the controller's times); a bin predicts its acceptance shrunk towards the
    pooled one by :data:`PRIOR` pseudo-counts. A row without a feature yet (its first block)
    gets the pooled acceptance. :meth:`new_call` forgets the rows, not the table."""

    def __init__(self):
        self.accepted = [0] * (len(EDGES) + 1)
        self.verified = [0] * (len(EDGES) + 1)
        self.feature: dict[int, float] = {}  # sequence -> its confidence feature

    def new_call(self) -> None:
        self.feature = {}

    def pooled(self) -> float:
        """The acceptance of every verified position so far (Beta(1, 1) prior)."""
        return acceptance(sum(self.accepted), sum(self.verified) - sum(self.accepted))

    def predict(self, seq: int) -> float:
        x = self.feature.get(seq)
        pooled = self.pooled()
        if x is None:
            return pooled
        i = bisect.bisect_left(EDGES, x)
        return (self.accepted[i] + PRIOR * pooled) / (self.verified[i] + PRIOR)

    def observe(self, seq: int, confidence: list[float], drafted: int, accepted: int) -> None:
        """Sequence ``seq``'s block: the drafter's largest probability at each draft
        (``confidence``, at least ``drafted`` of them), ``drafted`` drafts verified,
        ``accepted`` of them accepted. Calibrates the feature the block's prediction read, then
        moves the feature over the block's verified positions."""
        n = verified_positions(drafted, accepted)
        x = self.feature.get(seq)
        if x is not None and n:
            i = bisect.bisect_left(EDGES, x)
            self.accepted[i] += min(accepted, drafted)
            self.verified[i] += n
        for c in confidence[:n]:
            x = c if x is None else (1 - CONFIDENCE_EMA) * x + CONFIDENCE_EMA * c
        if x is not None:
            self.feature[seq] = x


class AcceptanceLog:
    """How well each predictor's acceptance foretold the blocks: the mean log-loss (nats) per
    verified draft position, each position a Bernoulli(``a``) outcome (accepted, or the block's
    rejected one), under the i.i.d. model the controller plans with."""

    def __init__(self):
        self.loss: dict[str, float] = {}
        self.positions = 0

    def add(self, predictions: dict[str, float], drafted: int, accepted: int) -> None:
        """One row's block scored under each predictor's ``predictions[name]``."""
        n = verified_positions(drafted, accepted)
        if not n:
            return
        rejected = int(accepted < drafted)
        for name, a in predictions.items():
            a = min(max(a, EPS), 1 - EPS)
            loss = -(n - rejected) * math.log(a) - rejected * math.log(1 - a)
            self.loss[name] = self.loss.get(name, 0.0) + loss
        self.positions += n

    def summary(self) -> dict:
        """``{predictor: mean log-loss, ..., "positions": n}``."""
        out = {k: v / self.positions for k, v in self.loss.items()} if self.positions else {}
        return {**out, "positions": self.positions}
