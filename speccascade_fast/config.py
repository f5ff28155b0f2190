"""What to decode with: :class:`DecodeConfig`, one keyword-only, validated settings type shared by
:func:`speccascade_fast.generate`, :class:`speccascade_fast.Engine` and the sequential loops.

Each argument is validated here, once, with a ``ValueError`` that names it and the allowed range;
the defaults of ``rule`` and ``alpha`` are resolved here too, so a built config is complete.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from . import checks
from .rules import DRAFTER_ONLY_RULES, PREFIX_RULES, check_alpha, check_rule

METHODS = (
    "spec_cascade", "token_cascade", "oracle_cascade", "seq_cascade", "autoregressive",
    "drafter_only",
)
BONUS = ("cascade", "verifier")
GAMMA_POLICIES = ("fixed", "goodput", "goodput_confidence")
SEQ_SCORES = ("prob", "mean_logprob")

#: The rule each method uses when ``rule=None``.
DEFAULT_RULE = {"spec_cascade": "token_v3", "token_cascade": "chow", "oracle_cascade": "diff"}

#: The lenience used when ``alpha=None`` (per rule; ``seq_cascade`` uses DEFAULT_SEQ_ALPHA).
#: token_v3 = 0.3: a draft is acceptable when the verifier gives it at least 70 % of the
#: probability of its own top token, i.e. near-ties of the verifier are settled in the drafter's
#: favour and confident verifier choices are kept. The others sit at a comparable, moderate point
#: of their ranges; sweep alpha for real use (docs/evaluation.md).
DEFAULT_ALPHA: dict[str, float | None] = {
    "spec": None, "drafter": None,
    "chow": 0.2,          # defer when the drafter's top probability is below 0.8
    "chow_log": 0.5,      # defer when the drafter's entropy exceeds 0.5 nats
    "diff": 0.0, "diff_log": 0.0,  # defer when the drafter is less confident than the verifier
    "opt": 0.0, "opt_log": 0.0,
    "token_v1": 0.1, "token_v2": 0.1,
    "token_v3": 0.3,
    "lossy": 0.2, "lossy_star": 0.2,
    "bild": 1.0,          # defer when -log p(draft) > 1 (p(draft) < 0.37) at T = 0
    "ensemble": 0.5,      # pi = 0.5 pT + 0.5 qT (Hugging Face's assistant_ensemble_weight)
}
DEFAULT_SEQ_ALPHA = 0.5
DEFAULT_MAX_DRAFTER_RUN = 10


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_draft_confidence(value) -> float | None:
    """``value`` as None or a float in (0, 1), else ValueError naming ``draft_confidence``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"draft_confidence must be None or a number in (0, 1) (the drafter "
                         f"probability below which a block stops drafting), got {value!r}")
    return float(value)


def check_temperature(value) -> float:
    """A scalar temperature as a float >= 0 (0 = greedy), else ValueError naming it."""
    return float(checks.temperature(value))


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """The decoding settings, validated on construction (see :func:`speccascade_fast.generate`
    for each field's meaning). ``rule`` and ``alpha`` given as None take the method's defaults
    (:data:`DEFAULT_RULE`, :data:`DEFAULT_ALPHA`, :data:`DEFAULT_SEQ_ALPHA`); methods without a
    rule (``autoregressive``, ``drafter_only``, ``seq_cascade``) keep ``rule=None``.

    Example:
        >>> DecodeConfig(rule="token_v3", alpha=0.3, gamma=4, temperature=0).alpha
        0.3
    """

    method: str = "spec_cascade"
    rule: str | None = None
    alpha: float | None = None
    gamma: int = 5
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    #: None, or Hugging Face's min-p truncation (after top-k / top-p): keep the tokens whose
    #: probability is >= ``min_p`` times the largest; the methods that sample one model
    #: (``autoregressive``, ``drafter_only``)
    min_p: float | None = None
    bonus: str = "cascade"
    max_drafter_run: int | None = DEFAULT_MAX_DRAFTER_RUN
    seq_score: str = "prob"
    backend: str = "auto"
    draft_confidence: float | None = None
    #: None, or ``logits_processor(ids [1, L], logits [1, V]) -> logits`` (Hugging Face's
    #: ``LogitsProcessor`` signature): applied to the drafter's and the verifier's logits alike
    #: at every position, with the sequence before that position (the sequential loops only;
    #: a processor with a ``bind(b)`` method is told the index of the sequence it will see)
    logits_processor: Callable | None = None
    #: how many drafts each block makes: ``"fixed"`` (always ``gamma``), ``"goodput"`` (chosen
    #: per block in ``{0 or 1, ..., gamma}`` to maximise expected tokens per second, see
    #: :mod:`speccascade_fast.goodput`), ``"goodput_confidence"`` (the same, each row's acceptance
    #: predicted from the drafter's confidence), or a schedule ``f(block_index, batch_size) ->
    #: gamma`` (the batched Engine only)
    gamma_policy: str | Callable = "fixed"
    #: the first ``exact_prefix`` emitted tokens of every response use the lossless rule
    #: (``spec``): a block that starts inside the prefix is verified losslessly (``spec_cascade``)
    exact_prefix: int = 0
    #: None, or the total variation distance each response may spend (docs/semantics.md §9):
    #: a position whose cost ``TV(pi, pT)`` would take the response past it is verified
    #: losslessly, so the law of the whole response is within this distance of the verifier's
    #: (``spec_cascade``; 0 is ``spec``, ``inf`` the plain rule)
    divergence_budget: float | None = None
    #: None, or a calibration file (:mod:`speccascade_fast.calibration`, written by
    #: ``speccascade calibrate``) or its loaded :class:`~speccascade_fast.calibration.Calibration`:
    #: it sets ``method``, ``rule`` and ``alpha`` (or the knob it calibrated), which must then be
    #: left unset (``rule`` may repeat the file's)
    calibration: object = None

    def __post_init__(self):
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen)
        if self.calibration is not None:
            from .calibration import apply

            for name, value in apply(self).items():
                set_(name, value)
        method = self.method
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not known; choose one of {', '.join(METHODS)}")
        if not _is_int(self.gamma) or self.gamma < 1:
            raise ValueError(f"gamma must be an int >= 1 (drafts per verifier call), got "
                             f"{self.gamma!r}")
        if self.bonus not in BONUS:
            raise ValueError(f"bonus={self.bonus!r} is not known; choose 'cascade' or 'verifier'")
        if self.seq_score not in SEQ_SCORES:
            raise ValueError(f"seq_score={self.seq_score!r} is not known; choose 'prob' or "
                             f"'mean_logprob'")
        if self.max_drafter_run is not None and (not _is_int(self.max_drafter_run)
                                                 or self.max_drafter_run < 0):
            raise ValueError(f"max_drafter_run must be None or an int >= 0, got "
                             f"{self.max_drafter_run!r}")
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a backend name such as 'auto', got "
                             f"{self.backend!r}")
        set_("temperature", check_temperature(self.temperature))
        set_("top_p", checks.top_p(self.top_p))
        set_("min_p", checks.min_p(self.min_p))
        if self.min_p is not None and method not in ("autoregressive", "drafter_only"):
            raise ValueError(f"min_p applies to method='autoregressive' or 'drafter_only' (one "
                             f"model's draws), got method={method!r}; a cascade truncates with "
                             f"top_k / top_p")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        set_("draft_confidence", check_draft_confidence(self.draft_confidence))
        if not _is_int(self.exact_prefix) or self.exact_prefix < 0:
            raise ValueError(f"exact_prefix must be an int >= 0 (the number of first tokens "
                             f"verified losslessly), got {self.exact_prefix!r}")
        if self.exact_prefix and (method != "spec_cascade" or self.draft_confidence is not None):
            raise ValueError(f"exact_prefix applies to method='spec_cascade' without "
                             f"draft_confidence, got method={method!r}, draft_confidence="
                             f"{self.draft_confidence!r}")
        if self.divergence_budget is not None:
            set_("divergence_budget", float(checks.divergence_budget(self.divergence_budget)))
            if method != "spec_cascade" or self.draft_confidence is not None:
                raise ValueError(f"divergence_budget applies to method='spec_cascade' without "
                                 f"draft_confidence, got method={method!r}, draft_confidence="
                                 f"{self.draft_confidence!r}")
        policy = self.gamma_policy
        if not (callable(policy) or policy in GAMMA_POLICIES):
            raise ValueError(f"gamma_policy must be one of {', '.join(GAMMA_POLICIES)} or a "
                             f"callable (block_index, batch_size) -> gamma, got {policy!r}")
        if policy != "fixed" and (method != "spec_cascade" or self.draft_confidence is not None):
            raise ValueError("gamma_policy other than 'fixed' applies to method='spec_cascade' "
                             "without draft_confidence (each cuts blocks its own way)")
        if self.logits_processor is not None and not callable(self.logits_processor):
            raise ValueError(f"logits_processor must be None or a callable (ids, logits) -> "
                             f"logits, got {type(self.logits_processor).__name__}")
        if self.draft_confidence is not None and method != "spec_cascade":
            raise ValueError(f"draft_confidence applies to method='spec_cascade' only, got "
                             f"method={method!r}")

        rule, alpha = self.rule, self.alpha
        if method in ("autoregressive", "drafter_only"):
            if rule is not None:
                check_rule(rule)  # a typo is an error even where no rule is used
            if alpha is not None:
                raise ValueError(f"alpha applies to methods with a deferral rule, not "
                                 f"method={method!r}; leave it None")
            rule, alpha = None, None
        elif method == "seq_cascade":
            rule = None
            alpha = DEFAULT_SEQ_ALPHA if alpha is None else alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                    or not 0 <= alpha <= 1 or math.isnan(alpha):
                raise ValueError(f"alpha must be in [0, 1] for seq_cascade, got {alpha!r}")
            alpha = float(alpha)
        else:
            rule = DEFAULT_RULE[method] if rule is None else rule
            check_rule(rule)
            if method == "token_cascade" and rule not in DRAFTER_ONLY_RULES:
                raise ValueError(f"rule={rule!r} needs the verifier; token_cascade takes "
                                 f"{' or '.join(sorted(DRAFTER_ONLY_RULES))}")
            if method == "oracle_cascade" and rule not in PREFIX_RULES | {"spec", "drafter"}:
                raise ValueError(f"rule={rule!r} is not a prefix rule; oracle_cascade takes "
                                 f"{', '.join(sorted(PREFIX_RULES))}, spec or drafter")
            alpha = DEFAULT_ALPHA[rule] if alpha is None else alpha
            check_alpha(rule, alpha)
            alpha = None if alpha is None else float(alpha)
        set_("rule", rule)
        set_("alpha", alpha)

    @property
    def bonus_step(self) -> bool:
        """Whether a block runs the drafter at the bonus position: ``bonus="cascade"`` needs q
        there, except under ``spec``, whose bonus law is pT whatever q is (the verification
        then draws the same token without it)."""
        return self.bonus == "cascade" and self.rule != "spec"

    @property
    def min_gamma(self) -> int:
        """The fewest drafts a block may make: 0 (a plain verifier step) where a block with no
        draft emits the rule's law at that position (``spec``, or ``bonus="verifier"``), else 1
        (under ``bonus="cascade"`` the position's law needs the drafter's q)."""
        return 0 if self.rule == "spec" or self.bonus == "verifier" else 1

    def settings(self) -> dict:
        """The settings a ``generate`` call reports in its statistics."""
        return {k: getattr(self, k) for k in ("method", "rule", "alpha", "gamma", "bonus",
                                              "temperature", "top_k", "top_p", "min_p",
                                              "draft_confidence", "exact_prefix",
                                              "divergence_budget")}


__all__ = ["BONUS", "GAMMA_POLICIES", "DEFAULT_ALPHA", "DEFAULT_MAX_DRAFTER_RUN", "DEFAULT_RULE",
           "DEFAULT_SEQ_ALPHA", "DecodeConfig", "METHODS", "SEQ_SCORES", "check_draft_confidence",
           "check_temperature"]
