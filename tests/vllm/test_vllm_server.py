"""vLLM's OpenAI-compatible server with the plugin: started by the test on 127.0.0.1 (``python -m
vllm.entrypoints.openai.api_server``, the command docs/vllm.md gives), one completion and one
chat request answered with a per-request rule and alpha (``vllm_xargs``), a bad alpha refused
with HTTP 400 naming the field, the acceptance on ``/metrics`` (vLLM's spec-decode counters and
the plugin's own), then the server stopped by its PID."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from . import require_vllm

require_vllm()

from speccascade_fast.integrations import vllm as plugin  # noqa: E402

STARTUP_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, timeout=120):
    """``(status, parsed JSON or text)`` of a GET (no body) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def server(pair_folders, tmp_path_factory):
    verifier, drafter = pair_folders
    port = free_port()
    logs = tmp_path_factory.mktemp("server")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(logs / "prometheus"))
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"])
    cmd = plugin.serve_command(  # the command docs/vllm.md gives, server default rule spec
        verifier, drafter, rule="spec",
        extra=["--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
               "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
               "--max-num-seqs", "8"])
    log = open(logs / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}): "
                                     + (logs / "server.log").read_text()[-3000:])
            try:
                if call(f"{base}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the server did not start in time: "
                                     + (logs / "server.log").read_text()[-3000:])
            time.sleep(2)
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_completion_with_a_per_request_rule(server):
    base, _ = server
    status, out = call(f"{base}/v1/completions", {
        "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 16,
        "temperature": 0, "vllm_xargs": {"speccascade_rule": "token_v3",
                                          "speccascade_alpha": 0.5}})
    assert status == 200, out
    assert out["choices"][0]["text"].strip()
    assert out["usage"]["completion_tokens"] == 16


def test_chat_with_a_per_request_rule(server):
    base, _ = server
    status, out = call(f"{base}/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "Name a primary color."}],
        "max_tokens": 12, "temperature": 1.0, "seed": 3,
        "vllm_xargs": {"speccascade_rule": "opt", "speccascade_alpha": 0.2}})
    assert status == 200, out
    assert out["choices"][0]["message"]["content"].strip()


def test_bad_alpha_is_a_400_naming_the_field(server):
    base, _ = server
    status, out = call(f"{base}/v1/completions", {
        "model": "smollm2", "prompt": "Hi", "max_tokens": 4,
        "vllm_xargs": {"speccascade_rule": "chow", "speccascade_alpha": 3}})
    assert status == 400
    assert "speccascade_alpha" in json.dumps(out)


def test_acceptance_and_deferrals_on_metrics(server):
    base, _ = server
    status, text = call(f"{base}/metrics")
    assert status == 200
    lines = text.splitlines()

    def value(prefix):
        return sum(float(ln.split()[-1]) for ln in lines if ln.startswith(prefix))

    assert value("vllm:spec_decode_num_draft_tokens_total") > 0
    assert value("speccascade_drafted_total") == value("vllm:spec_decode_num_draft_tokens_total")
    assert value("speccascade_accepted_total") == value(
        "vllm:spec_decode_num_accepted_tokens_total")
    assert value('speccascade_deferred_total{rule="token_v3"}') > 0
