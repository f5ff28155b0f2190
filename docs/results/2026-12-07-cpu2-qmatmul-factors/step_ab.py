"""One decoding step of the 1.5B (q4a8) with the kernel before (7d81f40) and after the vectorised
group factors, in one process: the two builds alternate per round (6 rounds, the order swapped
every other round), 12 steps per round and call size (M = 1: a decoding step; M = 6: a
verification of 5 drafts), medians in ms. Needs /tmp/qmatmul-before.cpp and
/tmp/qmatmul-after.cpp (run.sh writes them)."""
import pathlib
import statistics
import time

import torch

from speccascade_fast.kv_cache import SlotModel
from speccascade_fast.models import load_model
from speccascade_fast.quant import kernels


def interleaved(name: str, use, sizes=(1, 6), rounds: int = 6, steps: int = 12,
                on_model=None) -> dict:
    """Decoding calls of model ``name`` (q4a8, through the engine's cache) under two variants,
    ``use("before")`` / ``use("after")`` switching between them, alternating per round (the
    order swapped every other round): per (variant, call size) the median of each round's
    ``steps`` calls, in ms, contexts of 100..500 tokens. ``on_model(model)`` is called once the
    model is loaded (for a ``use`` that switches its layers)."""
    model, _ = load_model(name, weights="q4a8", progress=False)
    if on_model is not None:
        on_model(model)
    sm = SlotModel(model, 1, 700)
    sm.forward(torch.randint(0, 1000, (1, 100)), torch.arange(100)[None], 100, 1)
    res: dict = {}
    pos = 100
    with torch.inference_mode():
        for r in range(rounds):
            for which in (("before", "after") if r % 2 == 0 else ("after", "before")):
                use(which)
                for n in sizes:
                    ts = []
                    for _ in range(steps):
                        ids = torch.randint(0, 1000, (1, n))
                        t = time.perf_counter()
                        sm.forward(ids, torch.arange(pos, pos + n)[None], pos + n, n)
                        ts.append(time.perf_counter() - t)
                        pos = 100 + (pos - 100 + n) % 400
                    res.setdefault((which, n), []).append(statistics.median(ts) * 1e3)
    return res


def compared(res: dict, n: int, labels=("before", "after")) -> str:
    """One call size of :func:`interleaved`'s result: each variant's per-round medians (named
    by ``labels``), the medians of those, their ratio (after / before) and the per-round
    ratios."""
    b, a = res[("before", n)], res[("after", n)]
    return (f"{labels[0]} {[round(x, 1) for x in b]} ms, {labels[1]} {[round(x, 1) for x in a]} ms;"
            f" medians {statistics.median(b):.1f} / {statistics.median(a):.1f} ="
            f" {statistics.median(a) / statistics.median(b):.3f}x, per round "
            f"{[round(y / x, 3) for x, y in zip(b, a)]}")


def main() -> None:
    torch.set_num_threads(2)
    libs = {}
    for which in ("before", "after"):
        kernels.SOURCE = pathlib.Path(f"/tmp/qmatmul-{which}.cpp")  # built once, keyed by its bytes
        kernels._library.cache_clear()
        libs[which] = kernels._library()

    def use(which):
        kernels._library = lambda lib=libs[which]: lib

    res = interleaved("qwen2.5-coder-1.5b-instruct", use)
    for (which, n), v in sorted(res.items()):
        print(f"{which} M={n}: per round {[round(x, 1) for x in v]} ms, median "
              f"{statistics.median(v):.1f}")


if __name__ == "__main__":
    main()
