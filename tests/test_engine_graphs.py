"""What the Engine's CUDA graphs capture, checked on the CPU (the capture itself: tests/gpu).

With ``cuda_graphs`` each block is one body of device work on fixed shapes, replayed. Here:

* the fixed-shape bodies (every call attending over the whole cache, stale slots masked) give
  the tokens of the eager bodies (which attend over the block's longest prefix), in batches
  whose rows finish at different times, for ``spec_cascade`` (both bonus policies, T = 0 and
  T > 0), ``autoregressive`` and ``drafter_only``; the bodies run the bonus drafter step in
  every block, the eager blocks only where a row can use it;
* a body never reads the device from the host (no ``.item()``, ``nonzero``, boolean indexing,
  ...: what would break a capture or stall a replay), model forwards included, and the keys
  the graphs would be captured under are (body, batch size, first-call width, all-greedy);
* the drafter's sampler on the torch path (what CUDA runs) has no host read with ``greedy``
  given, truncated or not (the reference backend's truncation neither: tests/test_truncation.py
  covers the keep bounds a capture computes);
* NaN logits inside a block are a clear error after its one host read;
* ``cuda_graphs`` is checked: True needs CUDA models, no compile_drafter, and
  (in ``generate``) a method the batched Engine runs.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from speccascade_fast import Engine, generate
from speccascade_fast.sampling import draw

from .helpers import PROMPTS, NoHostReads, assert_graph_stats, left_padded, tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder:
    """Stands in for the engine's CUDA graphs: runs each body eagerly under NoHostReads and
    records the keys it would have been captured under. Like ``_Graphs`` it keeps one set of
    static inputs per key, cloned at the key's first call, and copies every call's inputs into
    them (an input whose shape changes under one key fails there, as a replay would), and a
    key's first call runs the body twice (``_Graphs``' warm-up run, then the replay of the
    capture), so a body that is not a function of its inputs alone changes the tokens."""

    def __init__(self):
        self.keys = []
        self.static = {}

    def __call__(self, key, body, inputs):
        with NoHostReads():
            static = self.static.get(key)
            if static is None:
                static = self.static[key] = [x.clone() for x in inputs]
                body(*static)
            for dst, src in zip(static, inputs):
                assert dst.shape == src.shape, (key, dst.shape, src.shape)
                dst.copy_(src)
            self.keys.append(key)
            return body(*static)


CASES = [
    dict(rule="spec", temperature=0.0),
    dict(rule="token_v3", alpha=0.3, temperature=1.0),
    dict(rule="token_v3", alpha=0.5, temperature=0.8, backend="reference"),
    dict(rule="chow", alpha=0.3, temperature=1.0, top_k=8, top_p=0.9, backend="reference"),
    dict(rule="lossy", alpha=0.2, temperature=0.7, bonus="verifier", gamma=3),
    dict(rule="opt", alpha=0.1, temperature=1.0, gamma=1),
    dict(method="autoregressive", temperature=1.0),
    dict(method="drafter_only", temperature=0.0),
]


def _fixed_shapes(engine, recorder=None):
    """Make ``engine`` run its bodies as its CUDA graphs would: whole-cache attention."""
    engine._full_kv = True
    engine._graphs = recorder
    return engine


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_fixed_shape_bodies_give_the_eager_tokens_without_host_reads(pair, kw):
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[5, 17, 24], eos_token_id=[])
    settings = dict(max_batch_size=3, max_seq_len=48, **kw)
    eager = Engine(*pair, **settings)
    assert not eager.cuda_graphs and eager._graphs is None  # CPU models: no graphs by default
    want = eager.generate(ids, **run)
    recorder = Recorder()
    got = _fixed_shapes(Engine(*pair, **settings), recorder).generate(ids, **run)
    assert got.new_tokens == want.new_tokens
    assert_graph_stats(got.stats, want.stats, kw)
    kind = "block" if kw.get("method", "spec_cascade") == "spec_cascade" else "step"
    greedy = kw["temperature"] == 0
    assert {k[0] for k in recorder.keys} == {kind}
    assert {k[-1] for k in recorder.keys} == {greedy}
    # rows finish after 5, 17 and 24 tokens: the batch shrinks 3 -> 2 -> 1
    sizes = [k[1] if kind == "block" else k[2] for k in recorder.keys]
    assert sizes[0] == 3 and sizes[-1] == 1 and sorted(sizes, reverse=True) == sizes
    if kind == "block":  # the drafter's first call feeds 1 or 2 tokens per row
        assert {k[2] for k in recorder.keys} <= {1, 2}


CUT_CASES = [
    dict(rule="spec", temperature=0.0, gamma=6, draft_confidence=0.3),
    dict(rule="token_v3", alpha=0.3, temperature=1.0, gamma=6, draft_confidence=0.2),
    dict(rule="chow", alpha=0.3, temperature=0.8, top_k=8, top_p=0.9, draft_confidence=0.2),
    dict(rule="lossy", alpha=0.2, temperature=1.0, bonus="verifier", draft_confidence=0.2),
]


@pytest.mark.parametrize("kw", CUT_CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_cut_block_bodies_give_the_eager_tokens_without_host_reads(pair, kw):
    """Blocks cut by ``draft_confidence`` on the graphs' fixed shapes: a body per drafter step
    and one for the verifier call with the ragged verification (again with the bonus rows where
    a row needs them), none reading the host; the eager tokens and counts, drafter calls
    included (both run the bonus step only where it is used)."""
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[5, 17, 24], eos_token_id=[])
    settings = dict(max_batch_size=3, max_seq_len=48, **kw)
    want = Engine(*pair, **settings).generate(ids, **run)
    recorder = Recorder()
    got = _fixed_shapes(Engine(*pair, **settings), recorder).generate(ids, **run)
    assert got.new_tokens == want.new_tokens
    for k in ("tokens", "verifier_calls", "accepted", "deferred", "blocks", "drafter_calls",
              "drafted"):
        assert got.stats[k] == want.stats[k], k
    kinds = {k[0] for k in recorder.keys}
    assert kinds <= {"draft", "score", "rescore"} and {"draft", "score"} <= kinds
    drafts = [k for k in recorder.keys if k[0] == "draft"]
    assert {k[-1] for k in drafts} == {kw["temperature"] == 0}
    assert {k[2] for k in drafts} <= {0, 1, 2}  # later steps, or the first call's width
    assert {k[1] for k in recorder.keys} == {3, 2, 1}  # rows leave the batch
    if kw.get("bonus", "cascade") == "cascade" and kw["rule"] != "spec":
        assert "rescore" in kinds  # these seeds accept whole blocks
    gamma = kw.get("gamma", 5)
    widths = {k[2] for k in recorder.keys if k[0] == "score"}
    assert widths <= set(range(1, gamma + 1)) and len(widths) > 1  # blocks of several lengths
    # a block: its first step (width 1 or 2), S - 1 later steps (width 0), the score over S;
    # then, where a row needs it, the bonus step (width 0) and the rescore
    keys, steps, blocks = recorder.keys, None, 0
    for i, k in enumerate(keys):
        if k[0] == "draft" and k[2] > 0:
            assert steps is None
            steps = 1
        elif k[0] == "draft" and steps is not None:
            steps += 1
        elif k[0] == "draft":  # after a score: the bonus step, then the rescore
            assert keys[i - 1][0] == "score" and keys[i + 1][0] == "rescore"
        elif k[0] == "score":
            assert steps == k[2]
            steps, blocks = None, blocks + 1
        else:
            assert keys[i - 1][0] in ("score", "draft") and keys[i - 1][1:2] == k[1:2]
    assert steps is None and blocks >= 3


def test_cut_block_bodies_on_the_triton_backend(pair, monkeypatch):
    """What a GPU would capture with the default backend there: the ragged Triton kernels
    (under the interpreter) inside the cut-block bodies, with no host read, give the tokens of
    the eager cpu backend."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[5, 17, 24], eos_token_id=[])
    kw = dict(max_batch_size=3, max_seq_len=48, **CUT_CASES[1])
    want = Engine(*pair, backend="cpu", **kw).generate(ids, **run)
    recorder = Recorder()
    got = _fixed_shapes(Engine(*pair, backend="triton", **kw), recorder).generate(ids, **run)
    assert got.new_tokens == want.new_tokens
    assert {"score", "rescore"} <= {k[0] for k in recorder.keys}


@pytest.mark.parametrize("cut", [None, 0.2], ids=["fixed", "cut"])
def test_block_bodies_with_the_triton_sampler(pair, monkeypatch, cut):
    """What a GPU runs in every drafter step at T > 0: the Triton sampler (under the interpreter)
    inside the fixed-shape bodies, with no host read, gives the tokens the eager engine draws with
    the C++ sampler (per-sequence T with a greedy row, top-k; fixed and cut blocks)."""
    import speccascade_fast.engine as se

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[5, 17, 24], eos_token_id=[],
               temperature=[0.0, 0.7, 1.0])
    kw = dict(max_batch_size=3, max_seq_len=48, rule="token_v3", alpha=0.3, gamma=3, top_k=8,
              draft_confidence=cut)
    want = Engine(*pair, **kw).generate(ids, **run)
    calls = []

    def triton_draw(*args, **kwargs):
        calls.append(kwargs.get("greedy"))
        return draw(*args, **kwargs, backend="triton")

    monkeypatch.setattr(se, "draw", triton_draw)
    got = _fixed_shapes(Engine(*pair, **kw), Recorder()).generate(ids, **run)
    assert got.new_tokens == want.new_tokens
    assert calls and set(calls) == {False}  # a greedy row in the batch: every draw is mixed


def test_full_acceptance_makes_the_first_drafter_call_two_wide(pair):
    """``drafter`` accepts every draft: with bonus="verifier" no bonus drafter step runs, so the
    next block's first call feeds the last draft and the bonus token (width 2)."""
    ids = torch.tensor([PROMPTS[0]])
    kw = dict(rule="drafter", temperature=1.0, gamma=3, bonus="verifier", max_seq_len=48)
    want = Engine(*pair, **kw).generate(ids, max_new_tokens=20, seed=1, eos_token_id=[])
    recorder = Recorder()
    got = _fixed_shapes(Engine(*pair, **kw), recorder).generate(ids, max_new_tokens=20, seed=1,
                                                                 eos_token_id=[])
    assert got.new_tokens == want.new_tokens
    assert [k[2] for k in recorder.keys] == [1] + [2] * (len(recorder.keys) - 1)


def test_torch_sampler_has_no_host_read_when_greedy_is_known():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    T = torch.tensor([0.0, 0.7, 1.0], dtype=torch.float64)
    seeds, pos = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    want = draw(logits, T, seeds, pos, backend="reference")
    with NoHostReads():
        got = draw(logits, T, seeds, pos, greedy=False, backend="reference")
        argmax = draw(logits, torch.zeros(3, dtype=torch.float64), seeds, pos, greedy=True,
                      backend="reference")
    assert torch.equal(got, want)
    assert torch.equal(argmax, logits.argmax(-1))
    with NoHostReads():
        cut = draw(logits, T, seeds, pos, 5, 0.8, greedy=False, backend="reference")
    assert torch.equal(cut, draw(logits, T, seeds, pos, 5, 0.8, backend="reference"))
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        draw(logits, T, seeds, pos, backend="reference")  # greedy unknown: reads T


def test_nan_logits_in_a_block_are_a_clear_error(pair):
    q, p = pair
    broken = tiny_pair()[1]
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = float("nan")
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="verifier logits contains NaN"):
        Engine(q, broken, max_seq_len=48).generate(ids, max_new_tokens=8)
    with pytest.raises(ValueError, match="drafter logits contains NaN"):
        Engine(broken, p, max_seq_len=48).generate(ids, max_new_tokens=8)
    with pytest.raises(ValueError, match="verifier logits contains NaN"):
        Engine(None, broken, method="autoregressive", max_seq_len=48).generate(
            ids, max_new_tokens=8)
    # blocks cut by draft_confidence (eager, ragged verification): the same errors
    for models, which in (((q, broken), "verifier"), ((broken, p), "drafter")):
        with pytest.raises(ValueError, match=f"{which} logits contains NaN"):
            Engine(*models, max_seq_len=48, draft_confidence=0.5).generate(
                ids, max_new_tokens=8)


def test_cuda_graphs_argument(pair):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the models on a CUDA device"):
        Engine(*pair, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be None, True or False"):
        Engine(*pair, cuda_graphs="yes")
    with pytest.raises(ValueError, match="compile_drafter=True are alternatives"):
        Engine(*pair, cuda_graphs=True, compile_drafter=True)
    assert Engine(*pair, cuda_graphs=False).cuda_graphs is False
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="cuda_graphs=True needs the models on a CUDA device"):
        generate(*pair, ids, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the batched Engine"):
        generate(*pair, ids, method="token_cascade", cuda_graphs=True)
    out = generate(*pair, ids, cuda_graphs=False, max_new_tokens=4, engine="sequential")
    assert len(out.new_tokens[0]) == 4


class _OpLog(TorchDispatchMode):
    """Logs the ops the host issues (views and the no-ops of ``tolist`` left out) while ``on``."""

    QUIET = {"aten::view", "aten::_unsafe_view", "aten::slice", "aten::select", "aten::alias",
             "aten::detach", "aten::detach_", "aten::expand", "aten::unsqueeze", "aten::squeeze",
             "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh"}

    def __init__(self):
        super().__init__()
        self.log, self.on = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and func._schema.name not in self.QUIET:
            self.log.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_cut_blocks_issue_no_device_work_between_drafter_steps(pair):
    """With CUDA graphs the host issues its own ops eagerly, one launch each, while the GPU
    waits: between two drafter steps of a cut block it only reads the step's packed result
    (and the graphs copy the next step's inputs); the steps store their logits and drafts in
    the step buffers themselves (no clone, stack or position arithmetic on the host)."""
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_batch_size=3, max_seq_len=48, rule="token_v3", alpha=0.3, temperature=1.0,
              gamma=6, draft_confidence=0.2)
    ops = _OpLog()
    recorder = Recorder()
    events = []

    def replay(key, body, inputs):  # the engine's host code is logged, the graphs' not
        events.append((key[0], len(ops.log)))
        ops.on = False
        try:
            return recorder(key, body, inputs)
        finally:
            ops.on = True

    engine = _fixed_shapes(Engine(*pair, **kw), replay)
    inner = engine._draft_confidence

    def logged(*args):
        ops.on = True
        try:
            return inner(*args)
        finally:
            ops.on = False

    engine._draft_confidence = logged
    with ops:
        engine.generate(ids, attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[5, 17, 24],
                        eos_token_id=[])
    between = [ops.log[a:b] for (k1, a), (k2, b) in zip(events, events[1:])
               if k1 == k2 == "draft"]
    assert len(between) >= 5  # blocks of several steps
    assert all(not o for o in between), [o for o in between if o][:3]


@pytest.mark.parametrize("kw", [CASES[1], CUT_CASES[1], CASES[6]],
                         ids=["fixed", "cut", "autoregressive"])
def test_graph_batch_sizes_are_buckets(pair, kw):
    """With graphs a batch runs at its bucket, the next power of two (at most max_batch_size):
    3 rows finishing one by one in an engine for 8 run as 4, 4, then 1 (2 rows pad to 2), so
    the graphs of a few sizes serve every size; the padding rows (row 0's inputs, free cache
    rows) change no sequence's tokens."""
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[5, 17, 24], eos_token_id=[])
    settings = dict(max_batch_size=8, max_seq_len=48, **kw)
    want = Engine(*pair, **settings).generate(ids, **run)
    recorder = Recorder()
    engine = _fixed_shapes(Engine(*pair, **settings), recorder)
    assert [engine._bucket(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    got = engine.generate(ids, **run)
    assert got.new_tokens == want.new_tokens
    sizes = {k[2] if k[0] == "step" else k[1] for k in recorder.keys}
    assert sizes == {4, 2, 1}  # 3 rows -> bucket 4, then 2, then 1
    assert Engine(*pair, max_batch_size=6, max_seq_len=48)._bucket(5) == 5  # eager: no padding
    capped = _fixed_shapes(Engine(*pair, max_batch_size=6, max_seq_len=48), Recorder())
    assert [capped._bucket(b) for b in (3, 5, 6)] == [4, 6, 6]


def test_mixed_rules_and_exact_prefix_in_fixed_shape_bodies(pair):
    """Rows with different rules (and rows inside their exact prefix, verified with spec) in
    one body: one verification per rule, gathered and scattered on the device with index
    tensors made before the capture; the eager tokens, no host read."""
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[14, 17, 24], eos_token_id=[],
               rule=["token_v3", "spec", "chow"], alpha=[0.5, None, 0.3], exact_prefix=[4, 0, 0])
    settings = dict(max_batch_size=4, max_seq_len=48, gamma=3, temperature=1.0)
    want = Engine(*pair, **settings).generate(ids, **run)
    recorder = Recorder()
    got = _fixed_shapes(Engine(*pair, **settings), recorder).generate(ids, **run)
    assert got.new_tokens == want.new_tokens
    # the first block: row 0 inside its exact prefix, the padding row repeating row 0
    assert recorder.keys[0][4] == ("spec", "spec", "chow", "spec")
    assert any("token_v3" in k[4] for k in recorder.keys)  # row 0 past its prefix


def test_divergence_budgets_in_fixed_shape_bodies(pair):
    """Rows with different divergence budgets (and one without: inf) in one body: the budget
    left is an input of the body (copied in before each replay, as into a captured graph's
    static inputs), the charges come back in the block's one packed read; the eager tokens and
    spending, no host read."""
    ids, mask = left_padded(PROMPTS)
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[14, 17, 24], eos_token_id=[],
               rule=["token_v3", "lossy", "token_v3"], alpha=[0.6, 0.4, 0.6],
               divergence_budget=[0.3, 0.05, float("inf")])
    settings = dict(max_batch_size=4, max_seq_len=48, gamma=3, temperature=1.0)
    want = Engine(*pair, **settings).generate(ids, **run)
    recorder = Recorder()
    got = _fixed_shapes(Engine(*pair, **settings), recorder).generate(ids, **run)
    assert got.new_tokens == want.new_tokens
    spent = [r["divergence_spent"] for r in got.stats["per_sequence"]]
    assert spent == pytest.approx([r["divergence_spent"] for r in want.stats["per_sequence"]])
    assert spent[0] <= 0.3 + 1e-9 and spent[1] <= 0.05 + 1e-9 and spent[2] > 0.3
    assert all(k[5] for k in recorder.keys)  # every block verified with the budget
