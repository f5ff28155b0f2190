"""The overhead benchmark (speccascade_fast/bench/overhead.py) on tiny random Qwen2 models."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from speccascade_fast.bench import overhead
from speccascade_fast.bench.overhead import QWEN_CODER, main, markdown, measure, random_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=64)


def test_measure_times_every_block_and_the_models_alone():
    d = random_model("0.5b", dtype=torch.float32, seed=0, **TINY)
    v = random_model("1.5b", dtype=torch.float32, seed=1, **TINY)
    assert v.config.num_key_value_heads == 2 and d.config.vocab_size == 64
    r = measure(d, v, batch=2, gamma=3, prompt_len=8, new_tokens=12, repeats=1)
    assert r["cuda_graphs"] is False and r["device"] == "cpu"
    assert r["tokens"] == 24  # EOS never stops a row
    assert 3 <= r["blocks"] <= 12  # 1 to gamma + 1 tokens per row and block
    assert r["block_ms"] > 0 and r["model_block_ms"] > 0 and r["non_model_share"] < 1
    assert markdown([r]).splitlines()[-1].startswith("| 2 | 3 | 0 | – | off | sdpa | ")


class _Clock:
    """A stand-in for ``time.perf_counter``: it moves only when told (``advance``, in ms)."""

    def __init__(self):
        self.ms = 0.0

    def perf_counter(self):
        return self.ms / 1e3

    def advance(self, ms):
        self.ms += ms


class _ScriptedEngine:
    """The parts of an Engine that measure() uses, taking scripted times on a :class:`_Clock`:
    each generate runs the next run's blocks (ms each) plus 2 ms outside them; the model
    forwards of a block take 0.5 ms per drafter step and the next scripted verifier call."""

    def __init__(self, clock, runs, verifier_ms, gamma):
        self.clock, self.runs, self.verifier_ms = clock, iter(runs), iter(verifier_ms)
        self.device, self.cuda_graphs = torch.device("cpu"), False
        self.cfg = SimpleNamespace(gamma=gamma, bonus_step=False)
        self.q = SimpleNamespace(forward=lambda *a: clock.advance(0.5))
        self.p = SimpleNamespace(forward=lambda *a: clock.advance(next(self.verifier_ms)))
        self.block_ms = iter(())

    def _block(self, rows):
        self.clock.advance(next(self.block_ms))

    def generate(self, ids, **kw):
        blocks = next(self.runs)
        self.block_ms = iter(blocks)
        for _ in blocks:
            self._block(None)  # (measure() replaces _block by its timed wrapper)
        self.clock.advance(2.0)
        return SimpleNamespace(stats={"tokens": 12, "drafter_calls": 9})


def test_measure_figures_by_hand(monkeypatch):
    """measure()'s figures from scripted times: the fastest of the timed runs, the median of
    its blocks, the median of the model forwards alone, worked out by hand."""
    clock = _Clock()
    runs = [[50.0, 50.0],  # the warm-up: not counted
            [10.0, 30.0, 20.0],  # 60 ms of blocks + 2 ms: 62 ms
            [4.0, 8.0, 6.0]]  # 18 ms + 2 ms: 20 ms, the fastest
    # 2 x 2 + 1 = 5 timed model blocks: 3 drafter steps of 0.5 ms + the verifier call:
    # 4.5, 2.5, 3.5, 6.5, 5.5 ms, median 4.5 ms
    verifier_ms = [3.0, 1.0, 2.0, 5.0, 4.0]
    engine = _ScriptedEngine(clock, runs, verifier_ms, gamma=3)
    monkeypatch.setattr(overhead, "time", clock)
    monkeypatch.setattr(overhead, "Engine", lambda *a, **k: engine)
    verifier = SimpleNamespace(config=SimpleNamespace(vocab_size=64))
    r = measure(None, verifier, batch=2, gamma=3, prompt_len=4, new_tokens=6, repeats=2)
    assert (r["blocks"], r["tokens"], r["drafter_calls"]) == (3, 12, 9)
    assert r["wall_s"] == pytest.approx(0.020)
    assert r["tokens_per_s"] == pytest.approx(600.0)  # 12 tokens / 0.020 s
    assert r["ms_per_token"] == pytest.approx(1.6666667)  # 20 ms / 12 tokens
    assert r["block_ms"] == pytest.approx(6.0)  # median of 4, 8, 6 ms
    assert r["model_block_ms"] == pytest.approx(4.5)
    assert r["non_model_share"] == pytest.approx(0.25)  # 1 - 4.5 / 6
    assert markdown([r]).splitlines()[-1] == (
        "| 2 | 3 | 0 | – | off | sdpa | 3 | 6.00 | 4.50 | 25.0 % | 1.67 | 600.0 |")


def test_the_real_shapes_and_the_command(tmp_path, capsys):
    assert QWEN_CODER["1.5b"]["num_hidden_layers"] == 28
    with pytest.raises(ValueError, match="size must be one of"):
        random_model("7b")
    out = tmp_path / "o"
    assert main(["--device", "cpu", "--dtype", "float32", "--batch", "1", "--gamma", "2",
                 "--prompt-len", "4", "--new-tokens", "6", "--repeats", "1", "--out", str(out),
                 "--overrides", json.dumps(TINY)]) == 0
    saved = json.loads((out / "overhead.json").read_text())
    assert saved["rows"][0]["tokens"] == 6 and saved["meta"]["overrides"] == TINY
    assert "non-model share" in (out / "overhead.md").read_text()
    with pytest.raises(SystemExit, match="--overrides"):
        main(["--overrides", "[1]"])


def test_attention_rows(tmp_path, flash_stand_in):
    """``--attention both``: one row with SDPA, one with flash-attn's kernel (here its stand-in)."""
    out = tmp_path / "o"
    assert main(["--device", "cpu", "--dtype", "float32", "--batch", "1", "--gamma", "2",
                 "--prompt-len", "4", "--new-tokens", "6", "--repeats", "1", "--out", str(out),
                 "--attention", "both", "--overrides", json.dumps(TINY)]) == 0
    rows = json.loads((out / "overhead.json").read_text())["rows"]
    assert [r["attention"] for r in rows] == ["sdpa", "flash_attn"] and flash_stand_in[0] > 0
    assert rows[0]["tokens"] == rows[1]["tokens"] == 6


def test_cut_block_rows(tmp_path):
    """``--draft-confidence none 1e-9``: fixed blocks, then blocks cut at a probability no random
    draft falls below, which draft gamma tokens too (the same drafter calls) but as cut blocks
    do; anything but numbers in (0, 1) and 'none' is refused."""
    out = tmp_path / "o"
    assert main(["--device", "cpu", "--dtype", "float32", "--batch", "2", "--gamma", "3",
                 "--prompt-len", "4", "--new-tokens", "9", "--repeats", "1", "--out", str(out),
                 "--draft-confidence", "none", "1e-9", "--overrides", json.dumps(TINY)]) == 0
    rows = json.loads((out / "overhead.json").read_text())["rows"]
    assert [r["draft_confidence"] for r in rows] == [None, 1e-9]
    assert rows[0]["drafter_calls"] == 2 * 3 * rows[0]["blocks"]  # per row: gamma per block
    # no draft is unsure: gamma per block too, but for the last blocks, which the budget cuts
    assert 2 * 3 * (rows[1]["blocks"] - 2) < rows[1]["drafter_calls"] < rows[0]["drafter_calls"]
    assert rows[0]["tokens"] == rows[1]["tokens"] == 18
    assert "| 2 | 3 | 0 | 1e-09 | off |" in (out / "overhead.md").read_text()
    for bad in ("0", "1", "x"):
        with pytest.raises(SystemExit, match="--draft-confidence takes numbers in"):
            main(["--draft-confidence", bad])


def test_temperature_rows(tmp_path):
    """``--temperature 0 1``: a greedy row and a sampled one (the drafter's sampler and the
    residual draws inside the blocks); a negative, infinite or NaN T is refused."""
    out = tmp_path / "o"
    assert main(["--device", "cpu", "--dtype", "float32", "--batch", "1", "--gamma", "2",
                 "--prompt-len", "4", "--new-tokens", "6", "--repeats", "1", "--out", str(out),
                 "--temperature", "0", "1", "--overrides", json.dumps(TINY)]) == 0
    rows = json.loads((out / "overhead.json").read_text())["rows"]
    assert [r["temperature"] for r in rows] == [0.0, 1.0]
    assert rows[0]["tokens"] == rows[1]["tokens"] == 6
    assert "| 1 | 2 | 1 | – | off |" in (out / "overhead.md").read_text()
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(SystemExit, match="--temperature takes finite numbers >= 0"):
            main(["--temperature", bad])
