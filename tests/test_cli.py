"""The ``speccascade`` command line on tiny models saved to a temporary folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    lines = _run(capsys, "w4 w5", *_base(folders), "--temperature", "1", "--seed", "3")
    lines = lines.rstrip("\n").split("\n")
    assert lines[-1].startswith("tokens=") and "verifier_calls=" in lines[-1]
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
    with pytest.raises(ValueError, match="draft_confidence"):
        cli.main(["generate", "w1", *_base(folders), "--draft-confidence", "1.5"])


def test_bad_arguments_exit(folders, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "w1", "--method", "beam"])
    with pytest.raises(ValueError, match="gamma"):
        cli.main(["generate", "w1", *_base(folders), "--gamma", "0"])
    # fp32 models on the CPU (and no flash-attn here): a clear error, not a crash in a kernel
    with pytest.raises(ValueError, match="attention='flash_attn'"):
        cli.main(["generate", "w1", *_base(folders), "--attention", "flash_attn"])
    with pytest.raises(SystemExit):
        cli.main([])


def test_python_dash_m(folders):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-m", "speccascade_fast", "generate", "w1 w2", *_base(folders),
         "--json"], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["stats"]["tokens"] >= 1
    assert torch.tensor(out["new_tokens"]).max() < len(WORDS)
