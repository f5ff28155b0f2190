"""The Engine's CUDA graphs on a GPU: the graph path equals the eager path.

Tiny random fp32 Llamas on CUDA (tests.helpers.tiny_pair), prompts of different lengths,
rows that finish at different times (graphs are captured for the bucket of every batch size
the eager run goes through: 3, then 2 and 1 unless rows finish in the same block, and replayed;
in an engine for 8 rows the 3 run as 4, padded):
``Engine(cuda_graphs=True)`` emits the tokens and statistics of ``Engine(cuda_graphs=False)``
(but for the drafter calls: the graphs run the bonus drafter step in every block) for
spec_cascade (T = 0 and T > 0, both bonus policies), autoregressive and drafter_only, with
top-k/top-p (keep bounds from torch's top-k and the Triton search), and with blocks cut by
``draft_confidence`` (a graph per drafter step, the ragged verification captured with
``max_spec_len``, the bonus step replayed between it and the verification again: the case that
found outputs clobbered through the graphs' shared pool); a second ``generate`` on the same
engine replays the graphs it captured and gives the same tokens again; a graph is captured once
per key.
"""
import pytest
import torch

from speccascade_fast import Engine

from ..helpers import PROMPTS, assert_graph_stats, left_padded, tiny_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [
    dict(rule="spec", temperature=0.0),
    dict(rule="spec", temperature=1.0, bonus="verifier"),
    dict(rule="token_v3", alpha=0.3, temperature=1.0),
    dict(rule="lossy", alpha=0.2, temperature=0.7, gamma=3),
    dict(method="autoregressive", temperature=1.0),
    dict(method="drafter_only", temperature=0.0),
    dict(rule="chow", alpha=0.3, temperature=1.0, top_k=8, top_p=0.9),  # sorted keep bounds
    # blocks cut by draft_confidence: a graph per drafter step, one per verification length
    dict(rule="spec", temperature=0.0, gamma=6, draft_confidence=0.3),
    dict(rule="token_v3", alpha=0.3, temperature=1.0, gamma=6, draft_confidence=0.2),
    dict(rule="chow", alpha=0.3, temperature=0.8, top_k=8, top_p=0.9, draft_confidence=0.2),
]


def batch_size(key) -> int:
    """The batch size in an Engine graph key (``("step", deferred, B, ...)``, else
    ``(body, B, ...)``)."""
    return key[2] if key[0] == "step" else key[1]


@pytest.fixture(scope="module")
def pair():
    return tuple(m.to("cuda") for m in tiny_pair())


@pytest.mark.parametrize("kw,max_batch", [(kw, 3) for kw in CASES]
                         + [(CASES[2], 8), (CASES[4], 8), (CASES[8], 8)],
                         ids=lambda v: "-".join(f"{x}" for x in v.values())
                         if isinstance(v, dict) else f"max{v}")
def test_graphs_give_the_eager_tokens(pair, kw, max_batch):
    ids, mask = left_padded(PROMPTS)
    ids, mask = ids.cuda(), mask.cuda()
    run = dict(attention_mask=mask, seed=[3, 4, 5], max_new_tokens=[5, 17, 24], eos_token_id=[])
    settings = dict(max_batch_size=max_batch, max_seq_len=64, **kw)
    reference = Engine(*pair, cuda_graphs=False, **settings)
    sizes = set()  # the batch sizes the eager run went through (rows may finish together)
    eager_run = reference._run
    reference._run = lambda key, *a: sizes.add(batch_size(key)) or eager_run(key, *a)
    eager = reference.generate(ids, **run)
    engine = Engine(*pair, **settings)
    assert engine.cuda_graphs  # the default on CUDA
    got = engine.generate(ids, **run)
    assert got.new_tokens == eager.new_tokens
    assert_graph_stats(got.stats, eager.stats, kw)
    captured = dict(engine._graphs.graphs)
    assert 3 in sizes and {batch_size(key) for key in captured} == {
        engine._bucket(b) for b in sizes}
    assert (4 in {batch_size(key) for key in captured}) == (max_batch == 8)  # 3 rows padded
    again = engine.generate(ids, **run)  # replays the graphs captured above
    assert again.new_tokens == eager.new_tokens
    assert engine._graphs.graphs.keys() == captured.keys()
