"""CUDA-graph capture, in one place for the engine, the tests and the benchmarks.

:func:`capture` runs a body once on a side stream (Triton compiles, cuBLAS picks its kernels), as
``torch.cuda.graphs`` recommends, then captures it. :class:`Graphs` keeps one captured graph per
key, sharing one memory pool, and replays it on new inputs.
"""
from __future__ import annotations

import torch


def capture(run, *args, pool=None):
    """``run(*args)`` warmed up once on a side stream, then captured: ``(graph, the captured
    call's outputs)``. The outputs are static tensors that every ``graph.replay()`` rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run(*args)
    return graph, outputs


class Graphs:
    """One CUDA graph per key (which body, its shapes), all sharing one memory pool.

    A key's first call clones its inputs into static tensors and captures the body on them (the
    warm-up runs the body once more than needed, harmless when a body's writes and draws are
    functions of its inputs alone). Every call copies the inputs into the static tensors and
    replays. The outputs are the graph's static tensors, valid until the next replay of *any*
    key: the pool is shared, so a graph captured later may hold its outputs where an earlier one
    keeps its intermediates (a caller reads or clones an output before it replays another)."""

    def __init__(self):
        self.graphs: dict = {}
        self.pool = None

    def __call__(self, key, body, inputs):
        entry = self.graphs.get(key)
        if entry is None:
            static = [x.clone() for x in inputs]
            graph, outputs = capture(body, *static, pool=self.pool)
            self.pool = graph.pool()
            entry = self.graphs[key] = (graph, static, outputs)
        graph, static, outputs = entry
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return outputs
