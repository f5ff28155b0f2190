"""The goodput controller: its choice from measured block times and acceptance (hand-computed),
exploration, and the nearest batch size's costs."""
from __future__ import annotations

import math

import pytest
import torch

from speccascade_fast.goodput import (
    EDGES,
    PRIOR,
    PROBE_AFTER,
    PROBE_MAX,
    PROBE_SHARE,
    AcceptanceLog,
    ConfidenceAcceptance,
    Goodput,
    acceptance,
    verified_positions,
)
from speccascade_fast.sampling import max_probability


def test_expected_tokens_by_hand():
    # E(gamma) = 1 + a + ... + a^gamma
    assert Goodput.expected_tokens([0.5], 0) == 1
    assert Goodput.expected_tokens([0.5], 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert Goodput.expected_tokens([0.5, 1.0], 3) == pytest.approx(1.875 + 4)
    assert acceptance(0, 0) == 0.5 and acceptance(8, 0) == 0.9  # (8 + 1) / (8 + 0 + 2)


def test_explores_then_picks_the_best_goodput():
    g = Goodput(gamma_max=4, allow_zero=True)
    assert g.choose(1, [0.8]) == 4
    g.observe(1, 4, 0.5)
    assert g.choose(1, [0.8]) == 1
    g.observe(1, 1, 0.2)
    assert g.choose(1, [0.8]) == 0
    g.observe(1, 0, 0.1)
    # line through (1, 0.2), (4, 0.5): t(gamma) = 0.1 + 0.1 gamma
    assert g.cost(1, 2) == pytest.approx(0.3) and g.cost(1, 3) == pytest.approx(0.4)
    # a = 0.8: tokens/s = 1 / 0.1 = 10 (gamma 0), 1.8 / 0.2 = 9, 2.44 / 0.3 = 8.1, ...
    assert g.choose(1, [0.8]) == 0
    # a cheap drafter, an expensive verifier: (1, 0.16), (4, 0.25): t = 0.13 + 0.03 gamma
    h = Goodput(gamma_max=4, allow_zero=True)
    for gamma, t in ((4, 0.25), (1, 0.16), (0, 0.1)):
        h.observe(1, gamma, t)
    # a = 0.95: E(4) = 4.524 -> 18.1 tok/s; E(3) = 3.71 / 0.22 = 16.9; gamma 0: 10
    assert h.choose(1, [0.95]) == 4
    # a = 0.2: E(0) / 0.1 = 10; E(1) = 1.2 / 0.16 = 7.5
    assert h.choose(1, [0.2]) == 0


def test_the_first_run_of_a_shape_is_replaced_not_averaged():
    g = Goodput(gamma_max=4, allow_zero=True)
    g.observe(1, 4, 5.0)  # a first block with one-time costs
    g.observe(1, 4, 0.5)
    assert g.times[(1, 4)] == 0.5
    g.observe(1, 4, 0.6)  # then EMA: 0.7 * 0.5 + 0.3 * 0.6
    assert g.times[(1, 4)] == pytest.approx(0.53)


def test_without_zero_never_plain_steps():
    g = Goodput(gamma_max=3, allow_zero=False)
    assert g.choose(2, [0.5, 0.5]) == 3
    g.observe(2, 3, 0.4)
    assert g.choose(2, [0.5, 0.5]) == 1
    g.observe(2, 1, 0.2)
    assert all(g.choose(2, [0.5, 0.5]) in (1, 2, 3) for _ in range(20))  # never 0


def test_other_batch_sizes_borrow_the_nearest_costs():
    g = Goodput(gamma_max=2, allow_zero=True)
    for gamma, t in ((2, 0.3), (1, 0.2), (0, 0.1)):
        g.observe(4, gamma, t)
    assert g.cost(3, 2) == 0.3  # nothing at 3: batch 4's
    g.observe(3, 0, 0.05)
    assert g.cost(3, 0) == 0.05 and g.cost(3, 1) == 0.2
    assert math.isinf(Goodput(2, True).cost(1, 1))


def test_a_run_of_plain_steps_ends_with_a_probe_and_probes_back_off():
    """gamma = 0 teaches nothing about acceptance: after PROBE_AFTER of them in a row the next
    block drafts (the best gamma >= 1); each probe that leaves gamma = 0 the best doubles the
    wait (up to PROBE_MAX), one that turns the choice to drafting resets it."""
    g = Goodput(gamma_max=4, allow_zero=True)
    for gamma, t in ((4, 0.5), (1, 0.2), (0, 0.1)):
        g.observe(1, gamma, t)
    # a = 0.8, t = 0.1 + 0.1 gamma: 0 is best (10 tok/s against 9 at gamma 1)
    chosen = [g.choose(1, [0.8]) for _ in range(PROBE_AFTER + 1 + 2 * PROBE_AFTER + 1)]
    assert chosen == [0] * PROBE_AFTER + [1] + [0] * (2 * PROBE_AFTER) + [1]
    for _ in range(20):
        while g.choose(1, [0.8]) == 0:
            pass
    assert g.probe_after == PROBE_MAX
    # a probe that measured drafting cheaper than thought: drafting wins, the wait resets
    g.observe(1, 1, 0.12)
    assert g.choose(1, [0.8]) >= 1 and g.probe_after == PROBE_AFTER
    # rules that cannot run gamma 0 never count plain steps
    h = Goodput(gamma_max=4, allow_zero=False)
    h.times, h.seen = dict(g.times), dict(g.seen)
    assert {h.choose(1, [0.8]) for _ in range(3 * PROBE_AFTER)} == {1}


def test_a_lagging_drafter_charges_drafting_its_catch_up_over_the_calls_remaining_tokens():
    """While the drafter lags, a drafting block is charged the predicted catch-up times the
    share of the remaining tokens it is expected to emit; a probe waits until the catch-up is
    at most PROBE_SHARE of the plain steps' time since the last drafting block."""
    g = Goodput(gamma_max=1, allow_zero=True)
    for gamma, t in ((1, 0.15), (0, 0.1)):
        g.observe(2, gamma, t)
    g.observe(2, 4, 0.3)  # a third point, so nothing is left to explore
    assert g.catch_up(100) == 0.0 and g.catch_up(100, prefill=True) == 0.0  # nothing timed
    # a = 0.8, 2 rows: gamma 1 emits 3.6 tokens in 0.15 s (24 tok/s), gamma 0 2 in 0.1 (20)
    assert g.choose(2, [0.8, 0.8], catch_up=0.0, remaining=10) == 1
    # charged 0.5 s / 10 tokens * 1.8 tokens per row: 3.6 / (0.15 + 0.09) = 15 < 20
    assert g.choose(2, [0.8, 0.8], catch_up=0.5, remaining=10) == 0
    # 100 tokens to go: 3.6 / (0.15 + 0.009) = 22.6 > 20
    assert g.choose(2, [0.8, 0.8], catch_up=0.5, remaining=100) == 1
    # a deferred prefill costs by its tokens; a catch-up after plain steps at least what the
    # last ones cost (a few tokens: mostly the call's fixed cost)
    g.observe_catch_up(100, 0.5, prefill=True)  # 5 ms a token
    assert g.catch_up(100, prefill=True) == pytest.approx(0.5)
    assert g.catch_up(4) == pytest.approx(0.02)  # no catch-up timed yet: by the rate
    g.observe_catch_up(4, 0.06)  # a 4-token catch-up took 60 ms
    assert g.catch_up(4) == pytest.approx(0.06) and g.catch_up(3) == pytest.approx(0.06)
    assert g.catch_up(100) == pytest.approx(0.5)  # a long one: the rate
    assert g.catch_up(4, prefill=True) == pytest.approx(0.02)
    g.observe_catch_up(100, 1.0, prefill=True)  # moving averages
    assert g.prefill_rate == pytest.approx(0.7 * 0.005 + 0.3 * 0.01)
    assert g.catch_up(0) == 0.0
    # the probe: after PROBE_AFTER plain steps only if the catch-up is cheap enough
    h = Goodput(gamma_max=4, allow_zero=True)
    for gamma, t in ((4, 0.5), (1, 0.2), (0, 0.1)):
        h.observe(1, gamma, t)
    catch = PROBE_SHARE * PROBE_AFTER * 0.1 * 1.05  # just too dear after PROBE_AFTER
    chosen = [h.choose(1, [0.8], catch_up=catch, remaining=1e9) for _ in range(PROBE_AFTER + 2)]
    assert chosen == [0] * (PROBE_AFTER + 1) + [1]
    # a new call: the plain steps counted towards the probe were the last call's
    h.probe_after = PROBE_AFTER
    for _ in range(3):
        h.choose(1, [0.8], remaining=1e9)
    h.new_call()
    assert h.zeros == 0
    # a catch-up too dear to ever fit the share: the probe comes after PROBE_MAX plain steps
    h.probe_after = PROBE_AFTER
    chosen = [h.choose(1, [0.8], catch_up=1e9, remaining=1e18) for _ in range(PROBE_MAX + 1)]
    assert chosen == [0] * PROBE_MAX + [1]


def test_verified_positions_are_the_accepted_and_the_first_rejected():
    assert verified_positions(5, 5) == 5  # all accepted
    assert verified_positions(5, 2) == 3  # 2 accepted, the third rejected
    assert verified_positions(5, 0) == 1
    assert verified_positions(0, 0) == 0


def test_confidence_acceptance_calibrates_its_feature_by_hand():
    c = ConfidenceAcceptance()
    assert c.predict(0) == 0.5  # nothing seen: the pooled Beta(1, 1) prior
    # the first block sets the feature only (no prediction read one): EMA over the verified
    # positions 0.9, 0.6, then 0.2 (rejected); the fourth draft came after the rejection
    c.observe(0, [0.9, 0.6, 0.2, 0.99], drafted=4, accepted=2)
    assert c.feature[0] == pytest.approx(0.5 * (0.5 * 0.9 + 0.5 * 0.6) + 0.5 * 0.2)
    assert sum(c.verified) == 0 and c.predict(0) == 0.5
    x = c.feature[0]  # 0.475: bin 0 (<= 0.5)
    # the next block, predicted from x, accepted all 3 drafts: bin 0 counts 3 of 3
    c.observe(0, [0.99, 0.99, 0.99], drafted=3, accepted=3)
    assert c.accepted[0] == c.verified[0] == 3 and x <= EDGES[0]
    pooled = acceptance(3, 0)  # 0.8
    assert c.pooled() == pytest.approx(pooled)
    # row 0's feature moved to 0.925 (0.9 < x <= 0.95: nothing counted there yet): pooled
    assert c.feature[0] == pytest.approx(0.925625) and EDGES[3] < c.feature[0] <= EDGES[4]
    assert c.predict(0) == pytest.approx(pooled)
    # a row whose feature sits in bin 0 gets that bin's rate shrunk to the pooled one
    c.feature[1] = 0.3
    assert c.predict(1) == pytest.approx((3 + PRIOR * pooled) / (3 + PRIOR))
    c.new_call()  # rows forgotten, the table kept
    assert c.feature == {} and c.predict(1) == pytest.approx(pooled) and c.verified[0] == 3


def test_confidence_acceptance_learns_an_informative_feature():
    """Confident stretches accepted, unsure ones rejected: the predictions separate."""
    c = ConfidenceAcceptance()
    for i in range(200):
        sure = (i // 10) % 2 == 0  # stretches of 10 blocks
        c.observe(0, [0.995] * 4 if sure else [0.4] * 4, drafted=4, accepted=4 if sure else 0)
    c.feature = {0: 0.995, 1: 0.4}
    assert c.predict(0) > 0.9 and c.predict(1) < 0.5  # pooled: 0.80


def test_acceptance_log_loss_by_hand():
    log = AcceptanceLog()
    log.add({"a": 0.8, "b": 0.5}, drafted=4, accepted=2)  # 2 accepted, 1 rejected
    log.add({"a": 0.8, "b": 0.5}, drafted=0, accepted=0)  # nothing verified: not scored
    s = log.summary()
    assert s["positions"] == 3
    assert s["a"] == pytest.approx(-(2 * math.log(0.8) + math.log(0.2)) / 3)
    assert s["b"] == pytest.approx(math.log(2))
    assert AcceptanceLog().summary() == {"positions": 0}


def test_max_probability_is_the_softmax_max_at_each_rows_temperature():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 11)
    t = torch.tensor([1.0, 0.5, 0.0])  # greedy reads T = 1
    before = logits.clone()
    got = max_probability(logits, t)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    want = torch.stack([torch.softmax(logits[r] / (t[r].item() or 1.0), -1).amax(-1)
                        for r in range(3)])
    torch.testing.assert_close(got, want)
    assert got.shape == (3, 2)


def test_the_confidence_table_moves_the_controllers_choice():
    """Same measured costs, same counts: a row whose drafter has been sure gets long blocks, one
    whose drafter has been unsure gets plain steps."""
    c = ConfidenceAcceptance()
    for i in range(200):  # sure stretches accepted, unsure ones rejected
        sure = (i // 10) % 2 == 0
        c.observe(0, [0.995] * 4 if sure else [0.4] * 4, drafted=4, accepted=4 if sure else 0)
    c.feature = {0: 0.995, 1: 0.4}
    g = Goodput(gamma_max=4, allow_zero=True)
    for gamma, t in ((4, 0.25), (1, 0.16), (0, 0.1)):  # t = 0.13 + 0.03 gamma for gamma >= 1
        g.observe(1, gamma, t)
    assert g.choose(1, [c.predict(0)]) == 4
    assert g.choose(1, [c.predict(1)]) == 0
