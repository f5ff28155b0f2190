"""How much of a block is engine overhead: random-weight models of the default pair's shapes.

On a GPU machine, where the real weights cannot be brought (and for a quick look on CPU):
Qwen2.5-Coder 0.5B (drafter) and 1.5B (verifier) configurations with random weights, the
:class:`speccascade_fast.Engine` decoding lossless ``spec`` greedily, or with ``--temperature``
at T > 0 (``cuda_graphs`` at its default: on for CUDA). Per block it reports

* the wall time of the engine's block (draft, score, verify, the host read and bookkeeping),
  timed around each block (a block ends with its device-to-host read, so no sync is missing);
* the time of the same block's model forwards alone (gamma one-token drafter calls and one
  (gamma + 1)-token verifier call at the run's middle context, the way the engine runs them:
  replayed as one CUDA graph when the engine uses graphs, eagerly otherwise);
* the non-model share ``1 - model / block``: sampling, verification, masks, the host read and
  Python.

Random models disagree, so about one token is emitted per block: acceptance is not meaningful
here, only the time per block and per token.

``--draft-confidence none 1e-9`` adds rows with blocks cut by ``draft_confidence``: a random
drafter gives every draft a probability far above 1e-9, so those blocks still draft gamma
tokens (but where the budget ends them) and run the same model forwards, but as cut blocks do
(a host read after each drafter step; with graphs a graph per step and one for the
verification): the difference is what the cut costs.

    python -m speccascade_fast.bench.overhead --device cuda --batch 1 4 --out docs/results/<date>-<machine>-overhead
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

from ..config import check_draft_confidence
from ..engine import Engine
from ..graphs import capture

#: the default pair's shapes (the converted GGUF configurations)
QWEN_CODER = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12),
}
COMMON = dict(num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
              rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)


def random_model(size: str, *, device="cpu", dtype=torch.bfloat16, seed: int = 0, **overrides):
    """A Qwen2 causal LM with the shapes of ``QWEN_CODER[size]`` (``overrides`` replace any
    field, e.g. a tiny one for tests) and random weights, SDPA attention, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in QWEN_CODER:
        raise ValueError(f"size must be one of {', '.join(QWEN_CODER)}, got {size!r}")
    cfg = Qwen2Config(**{**COMMON, **QWEN_CODER[size], **overrides})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_block_seconds(engine: Engine, batch: int, context: int, repeats: int) -> float:
    """Median seconds of one block's model forwards alone, at ``context`` tokens."""
    q, p, gamma, device = engine.q, engine.p, engine.cfg.gamma, engine.device
    kv = engine.slots - 1 if engine.cuda_graphs else context + gamma
    ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    block_ids = torch.zeros(batch, gamma + 1, dtype=torch.int64, device=device)

    def forwards():
        for j in range(gamma + engine.cfg.bonus_step):
            slots = torch.full((batch, 1), context + j - 1, device=device)
            q.forward(ids, slots, kv, 1)
        slots = (context - 1) + torch.arange(gamma + 1, device=device).expand(batch, -1)
        p.forward(block_ids, slots, kv, gamma + 1)

    run = forwards
    if engine.cuda_graphs:
        run = capture(forwards)[0].replay  # warm-up, then the same calls captured
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(drafter, verifier, *, batch: int = 1, gamma: int = 5, prompt_len: int = 128,
            new_tokens: int = 64, repeats: int = 3, cuda_graphs: bool | None = None,
            seed: int = 0, attention: str | None = None,
            draft_confidence: float | None = None, temperature: float = 0.0) -> dict:
    """One configuration: ``batch`` random prompts of ``prompt_len`` tokens, ``new_tokens``
    each, ``spec`` at ``temperature`` (0: greedy); a warm-up ``generate`` (captures the
    graphs), then ``repeats`` timed ones. Returns the figures described in the module
    docstring."""
    engine = Engine(drafter, verifier, max_batch_size=batch, max_seq_len=prompt_len + new_tokens,
                    rule="spec", gamma=gamma, temperature=temperature, cuda_graphs=cuda_graphs,
                    attention=attention, draft_confidence=draft_confidence)
    device = engine.device
    g = torch.Generator().manual_seed(seed)
    vocab = verifier.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    block_times: list[float] = []
    inner = engine._block

    def timed_block(rows):
        start = time.perf_counter()
        inner(rows)
        block_times.append(time.perf_counter() - start)

    engine._block = timed_block
    with torch.inference_mode():
        out = engine.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])  # warm-up
        runs = []
        for _ in range(repeats):
            block_times.clear()
            _sync(device)
            start = time.perf_counter()
            out = engine.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
            _sync(device)
            runs.append((time.perf_counter() - start, list(block_times)))
        wall, blocks = min(runs, key=lambda r: r[0])
        model = _model_block_seconds(engine, batch, prompt_len + new_tokens // 2, 2 * repeats + 1)
    block = statistics.median(blocks)
    tokens = out.stats["tokens"]
    return {
        "batch": batch, "gamma": gamma, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "device": str(device), "cuda_graphs": engine.cuda_graphs, "temperature": temperature,
        "attention": attention or "sdpa", "draft_confidence": draft_confidence,
        "drafter_calls": out.stats["drafter_calls"], "blocks": len(blocks),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "block_ms": 1e3 * block, "ms_per_token": 1e3 * wall / tokens,
        "model_block_ms": 1e3 * model, "non_model_share": 1 - model / block,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| batch | γ | T | blocks cut at | CUDA graphs | attention | blocks | ms / block "
             "| model ms / block | non-model share | ms / token | tokens/s |",
             "| ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cut = r.get("draft_confidence")
        lines.append(f"| {r['batch']} | {r['gamma']} | {r.get('temperature', 0.0):g} | "
                     f"{'–' if cut is None else f'{cut:g}'} | "
                     f"{'on' if r['cuda_graphs'] else 'off'} | "
                     f"{r.get('attention', 'sdpa')} | "
                     f"{r['blocks']} | {r['block_ms']:.2f} | {r['model_block_ms']:.2f} | "
                     f"{100 * r['non_model_share']:.1f} % | {r['ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--graphs", choices=("auto", "on", "off", "both"), default="auto",
                    help="CUDA graphs: the engine's default, forced on/off, or both rows")
    ap.add_argument("--attention", choices=("sdpa", "flash_attn", "both"), default="sdpa",
                    help="the engine's attention: PyTorch SDPA, flash-attn's kernel, or both rows")
    ap.add_argument("--draft-confidence", nargs="+", default=["none"], metavar="P",
                    help="blocks cut after a draft below P (a number in (0, 1)), or 'none' "
                         "(fixed blocks); several give several rows")
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0], metavar="T",
                    help="sampling temperatures (0: greedy, the default); several give several "
                         "rows (T > 0 adds the drafter's sampler and the residual draws)")
    ap.add_argument("--out", default=None, help="folder for overhead.json and overhead.md")
    ap.add_argument("--overrides", default="{}", metavar="JSON",
                    help="config fields to replace in both models (a smoke run: "
                         "'{\"num_hidden_layers\": 2}')")
    args = ap.parse_args(argv)
    for name in ("gamma", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch) < 1:
        raise SystemExit("--batch must be >= 1")
    if not all(t >= 0 and t != float("inf") for t in args.temperature):  # NaN fails too
        raise SystemExit(f"--temperature takes finite numbers >= 0, got {args.temperature}")
    cuts = []
    for value in args.draft_confidence:
        try:  # float() or the engine's own check
            cuts.append(None if value == "none" else check_draft_confidence(float(value)))
        except ValueError:
            raise SystemExit(f"--draft-confidence takes numbers in (0, 1) or 'none', got "
                             f"{value!r}") from None
    try:
        overrides = json.loads(args.overrides)
        assert isinstance(overrides, dict)
    except (ValueError, AssertionError):
        raise SystemExit(f"--overrides must be a JSON object, got {args.overrides!r}") from None
    dtype = getattr(torch, args.dtype)
    drafter = random_model("0.5b", device=args.device, dtype=dtype, seed=0, **overrides)
    verifier = random_model("1.5b", device=args.device, dtype=dtype, seed=1, **overrides)
    graphs = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.graphs]
    attentions = {"sdpa": [None], "flash_attn": ["flash_attn"],
                  "both": [None, "flash_attn"]}[args.attention]
    rows = []
    for batch in args.batch:
        for t in args.temperature:
            for cut in cuts:
                for g in graphs:
                    for a in attentions:
                        rows.append(measure(drafter, verifier, batch=batch, gamma=args.gamma,
                                            prompt_len=args.prompt_len,
                                            new_tokens=args.new_tokens, repeats=args.repeats,
                                            cuda_graphs=g, attention=a, draft_confidence=cut,
                                            temperature=t))
                        print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
                else "cpu", "torch": torch.__version__, "overrides": overrides,
                "argv": sys.argv[1:] if argv is None else list(argv)}
        (out / "overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "overhead.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
