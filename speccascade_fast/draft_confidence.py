"""Blocks cut by ``draft_confidence``: each row stops drafting after its first draft whose drafter
probability is below the cut-off (or an EOS draft, its budget, ``gamma``), exactly where the
sequential engine stops; the drafter steps go on while any row drafts, and each row is verified
on its own drafts in one ragged verification.

Every piece is a body of fixed shapes (replayed as a CUDA graph when the engine has them): a
drafter step (its draw and whether the draft is unsure; one host read each), then the verifier's
forward over the S drafts of the longest row with the ragged verification (drafts, q and p stay
padded to S per row; the flattened rows are gathered on the device, padding after ``cu[B]``),
and, if a row needs it, the verification again with the bonus rows. Between two drafter steps
the host only reads the step's packed result and feeds it back as the next step's input: the
steps write their logits and drafts into step buffers themselves, at the step index the packed
positions carry, so nothing is cloned or stacked per step.
"""
from __future__ import annotations

import functools

import torch

from . import backends, checks
from .layout import row_owners
from .pack import BlockResult, Layout, nonfinite
from .sampling import draft_probability

#: a drafter step's host read: its draft, whether the drafter gave it less than the cut-off,
#: whether the logits were non-finite, the draft's position and the block's first position
DRAFT_STEP = Layout("DraftStep", draft=1, unsure=1, nonfinite=1, position=1, first=1)


@functools.cache
def verified_layout(S: int, p_nonfinite: bool) -> Layout:
    """A ragged verification's host read for blocks of at most S drafts: the accepted count, the
    S + 1 output tokens and deferral flags (and whether the verifier's logits were
    non-finite)."""
    extra = {"p_nonfinite": 1} if p_nonfinite else {}
    return Layout("Verified", accepted=1, tokens=[S + 1], deferred=[S + 1], **extra)


class DraftConfidenceBlocks:
    """The ``draft_confidence`` block of an :class:`~speccascade_fast.engine.Engine`, with its
    step buffers: ``[max_batch_size, gamma + 1, V]`` drafter logits and ``[max_batch_size,
    gamma + 1]`` drafts, column j for step j (the last column: the bonus step's). They are
    allocated on the first step ever (which runs eagerly even with CUDA graphs: a graph's first
    call runs its body before the capture), so a captured step only writes into them and their
    addresses never change."""

    def __init__(self, engine):
        self.engine = engine
        self.buffers = None

    def _buffers(self, logits: torch.Tensor | None = None):
        if self.buffers is None:
            n, cols = self.engine.max_batch_size, self.engine.cfg.gamma + 1
            self.buffers = (logits.new_empty(n, cols, logits.shape[-1]),
                            torch.empty(n, cols, dtype=torch.int64, device=logits.device))
        return self.buffers

    def __call__(self, rows, width: int):
        """One block for every unfinished row: row b stops drafting after draft gamma_b. A row
        that stopped early has q at its bonus position from the later steps; the bonus drafter
        step runs only if a row that drafted to the end accepted everything and keeps a bonus
        (then the ragged verification runs again with the bonus rows). Returns what
        :meth:`Engine._fixed_block` does."""
        eng = self.engine
        cfg, q, B = eng.cfg, eng.q, rows.size
        nb = eng._bucket(B)  # the rows the bodies run (B, or B's bucket with CUDA graphs)
        seeds, temperature, alpha = rows.padded(nb)
        greedy, args = rows.greedy, (seeds, temperature)
        kv = eng._kv(rows)

        def drafted(logits, tj, t0, seeds, temperature):
            """Draw draft j = tj - t0 (the same j in every row), store it and its logits in the
            step buffers (column j) and pack the step's result for the host."""
            x = eng._draw(logits, seeds, temperature, tj, greedy)
            unsure = draft_probability(logits, x, temperature) < cfg.draft_confidence
            q_buf, d_buf = self._buffers(logits)
            j = (tj - t0)[:1]
            q_buf[:nb].index_copy_(1, j, logits[:, None])
            d_buf[:nb].index_copy_(1, j, x[:, None])
            return DRAFT_STEP.pack(draft=x, unsure=unsure, nonfinite=nonfinite(logits),
                                   position=tj, first=t0)

        def first(ints, seeds, temperature):
            logits = q.forward(ints[:, 1 + width:], ints[:, 1: 1 + width], kv(0), 1)[:, 0]
            return drafted(logits, ints[:, 0], ints[:, 0], seeds, temperature)

        def later(j):  # the step that feeds draft j - 1 and draws draft j: input, step j - 1's pack
            def body(prev, seeds, temperature):
                position = DRAFT_STEP.get(prev, "position")
                logits = q.forward(DRAFT_STEP.get(prev, "draft")[:, None], position[:, None],
                                   kv(j), 1)[:, 0]
                return drafted(logits, position + 1, DRAFT_STEP.get(prev, "first"), seeds,
                               temperature)
            return body

        ints = eng._inputs(rows, q, width, nb)
        limit = [min(cfg.gamma, rows.remaining(b)) for b in range(B)]
        stop = [0] * B  # gamma_b once row b has stopped
        mine = [[] for _ in range(B)]  # row b's drafts, on the host
        S = 0  # drafter steps so far
        pack = eng._run(("draft", nb, width, greedy), first, (ints, *args))
        q_buf, d_buf = self._buffers()  # allocated by that first step (eager even with graphs)
        while True:
            host = DRAFT_STEP.unpack(pack, B)  # the step's one device-to-host read
            eng._check_logits([r.nonfinite for r in host], ("drafter logits", q_buf[:B, S]))
            for b, r in enumerate(host):
                if not stop[b]:
                    mine[b].append(r.draft)
                    if r.unsure or r.draft in rows.eos or S + 1 >= limit[b]:
                        stop[b] = S + 1
            S += 1
            if all(stop):
                break
            pack = eng._run(("draft", nb, 0, greedy), later(S), (pack, *args))
        calls = S
        q_logits, drafts = q_buf[:nb, :S], d_buf[:nb, :S]  # fixed addresses: read, not copied
        # (the padding rows are verified on one draft; nothing reads their outputs)
        stops = torch.tensor(stop + [1] * (nb - B), dtype=torch.int64, device=ints.device)
        head = ints[:, (0, -1)]  # first draft position, the row's last token (ints' width varies)
        verified = self._verified

        def score(head, stops, seeds, temperature, alpha):
            t = head[:, 0]
            slots = (t - 1)[:, None] + torch.arange(S + 1, device=t.device)
            p_logits = eng.p.forward(torch.cat([head[:, 1:], drafts], dim=1), slots, kv(S),
                                     S + 1)
            out = verified(q_logits, drafts, p_logits, stops, None, t, seeds, temperature, alpha)
            return verified_layout(S, True).pack(**out, p_nonfinite=nonfinite(p_logits)), p_logits

        def rescore(head, p_logits, stops, bonus, seeds, temperature, alpha):
            out = verified(q_logits, drafts, p_logits, stops, bonus, head[:, 0], seeds,
                           temperature, alpha)
            return verified_layout(S, False).pack(**out)

        pack, p_logits = eng._run(("score", nb, S), score, (head, stops, *args, alpha))
        host = verified_layout(S, True).unpack(pack, B)  # the bonus from pT
        eng._check_logits([r.p_nonfinite for r in host], ("verifier logits", p_logits))
        need = [eng._needs_bonus(rows, b, r.accepted, mine[b], cfg.rule)
                for b, r in enumerate(host)]
        if any(need):
            q_all = q_logits
            if any(n and g == S for n, g in zip(need, stop)):
                if eng._graphs is not None:  # the bonus step's replay may reuse its memory
                    p_logits = p_logits.clone()  # (Graphs: outputs live until any replay)
                # the last step's pack again, from the buffers (the score graph may have reused
                # the memory of the step's output)
                t0 = head[:, 0]
                zero = torch.zeros_like(t0)
                last = DRAFT_STEP.pack(draft=d_buf[:nb, S - 1], unsure=zero, nonfinite=zero,
                                       position=t0 + S - 1, first=t0)
                bpack = eng._run(("draft", nb, 0, greedy), later(S), (last, *args))
                eng._check_logits(DRAFT_STEP.get(bpack, "nonfinite")[:B].tolist(),
                                  ("drafter logits", q_buf[:B, S]))
                q_all = q_buf[:nb, :S + 1]
                calls += 1
            # rows that need no bonus take any row of theirs: their bonus token is never emitted
            at = stops.clamp(max=q_all.shape[1] - 1)
            bonus = q_all[torch.arange(nb, device=ints.device), at]
            pack = eng._run(("rescore", nb, S), rescore,
                            (head, p_logits, stops, bonus, *args, alpha))
            host = verified_layout(S, False).unpack(pack, B)
        return [BlockResult(r.accepted, r.tokens[: 1 + r.accepted], r.deferred, stop[b])
                for b, r in enumerate(host)], calls

    def _verified(self, q_logits, drafts, p_logits, stops, bonus, t, seeds, temperature,
                  alpha) -> dict:
        """The ragged verification of a cut block on fixed shapes: per row the accepted count,
        the S + 1 tokens and deferral flags. Row b owns the first ``stops[b]`` of its S drafts
        (``q_logits`` ``[B, S, V]``, ``drafts`` ``[B, S]``) and ``stops[b] + 1`` of its verifier
        rows (``p_logits`` ``[B, S + 1, V]``); ``bonus``: ``[B, V]`` drafter rows at the bonus
        positions, or None (the bonus from pT). The flattened layout is gathered on the device
        (``B S`` draft rows, padding after ``cu[B]``), so nothing here reads the host."""
        eng = self.engine
        cfg = eng.cfg
        B, S = drafts.shape
        cu = torch.nn.functional.pad(stops.cumsum(0), (1, 0))
        b, j = row_owners(cu, B * S)
        bt, jt = row_owners(cu, B * S + B, target=True)
        j, jt = j.clamp(0, S - 1), jt.clamp(0, S)  # padding rows: any row
        if eng._backend is None:
            eng._backend = backends.resolve(cfg.backend, eng.device, "verify_ragged")
        out = backends.verify_ragged(eng._backend, q_logits[b, j], drafts[b, j], p_logits[bt, jt], cu,
                          bonus, max_spec_len=S, rule=cfg.rule, alpha=alpha,
                          temperature=temperature,
                          top_k=checks.top_k(cfg.top_k, p_logits.shape[-1]), top_p=cfg.top_p,
                          seed=seeds, positions=t)
        return dict(accepted=out.num_accepted, tokens=out.tokens, deferred=out.deferred)
