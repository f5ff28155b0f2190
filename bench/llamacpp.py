"""Against llama.cpp on this CPU: llama.cpp built from source for this machine, on the same GGUF
files, the same HumanEval prompts and the same number of new tokens as ``speccascade bench``,
with our engine's ``--weights q4`` runs interleaved in the same run. Never in CI.

    python bench/llamacpp.py --out runs/llamacpp                  # everything, defaults below
    python bench/llamacpp.py --build-only                         # fetch and build llama.cpp
    python bench/llamacpp.py --prompts 1 --max-new-tokens 16 --rounds 1 --threads 1 \\
        --no-ours --out /tmp/l                                    # a quick look

What it does:

1. llama.cpp's source: the tree vendored in the PyPI sdist of ``llama-cpp-python``
   (``pip download --no-binary :all: --no-deps llama-cpp-python[==--llama-cpp-python]``) in
   ``--cache`` (default ``~/.cache/speccascade_fast/llamacpp``), unpacked there; the llama.cpp
   commit is the one the sdist's CHANGELOG names for its version.
2. A CMake Release build for this CPU (``-DGGML_NATIVE=ON`` less AMX, see ``NO_AMX``; no
   CUDA, no curl/OpenSSL, no server), only ``llama-bench``, ``llama-completion``,
   ``llama-simple``, ``llama-speculative`` and ``llama-speculative-simple``, ``-j2``, niced.
   A later run whose build folder holds the binaries built with the same arguments
   (``build-stamp.json``) skips it.
3. The default pair's GGUF files, assembled from their wheels (and checked: size and sha256)
   into ``--cache``/gguf once: the very files ``--weights q4`` loads its blocks from.
4. ``--rounds`` rounds; in each, for each of ``--threads``, every configuration once, each in a
   process of its own, every other round in reverse order (so that the machine's drift over the
   run biases no configuration):

   * ``llama-bench`` on the verifier (and the drafter): ``pp<P>`` and ``tg<N>`` as llama-bench
     reports them (P: the prompts' mean token count), ``--bench-reps`` repetitions;
   * ``llama-completion`` on the verifier alone (plain decoding), one process per prompt, at
     each of ``--temps``, ``--ignore-eos`` and ``-n N`` (EOS stops no one, as in our bench);
   * ``llama-speculative-simple`` with the 0.5B drafting for the 1.5B, at each draft length
     of ``--draft-max`` (``default``: the tool's own) and each of ``--temps``, one process per
     prompt, ``--ignore-eos``;
   * ours: ``python -m speccascade_fast bench --weights W --batch 1 --no-hf --configs
     --our-configs --prompts n --max-new-tokens N --rounds 1 --threads T`` for each W of
     ``--our-weights`` (``q4``, ``q4a8``; unless ``--no-ours``).

   T = 1 means plain sampling for llama.cpp too (``--top-k 0 --top-p 1 --min-p 0``; its
   default chain would truncate). Each process's wall time, peak resident memory (ru_maxrss
   from wait4: the process's VmHWM) and the load average before it are recorded.
5. ``--out``: ``llamacpp.json`` (everything: per process, per configuration), ``llamacpp.md``
   (the table), ``logs/`` (each process's output), ``prompts/`` (the prompt texts).

Decode tok/s is as each tool reports it: llama-completion's ``eval`` (tokens after the first
over their time), llama-speculative-simple's ``decoded ... speed``, llama-bench's ``tg``; ours
is tokens / (wall time less the prompts' prefill), as ``speccascade bench`` reports its
decoding alone. "With prefill" adds the prompt's processing (llama.cpp: ``prompt eval`` /
``encoded``; ours: the row's wall time) and leaves loading out; the process's wall time has
everything (loading included: llama.cpp loads once per prompt, we once per process).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ("llama-bench", "llama-completion", "llama-simple", "llama-speculative",
         "llama-speculative-simple")
CMAKE_ARGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
              "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF")
# -march=native minus AMX: this machine's (a KVM guest's) CPU flags list amx_tile/int8/bf16, but
# ggml's AMX kernels die there with SIGILL on their first tile instruction (tilezero); --amx
# builds with them anyway
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def say(msg: str) -> None:
    print(f"[llamacpp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def default_cache() -> pathlib.Path:
    sys.path.insert(0, str(ROOT))
    from speccascade_fast.models import cache_dir

    return cache_dir() / "llamacpp"


# ---------------------------------------------------------------------------------------------
# 1-2: source and build


def fetch_source(cache: pathlib.Path, version: str | None) -> dict:
    """The sdist (downloaded once) unpacked under ``cache/src``; its llama.cpp tree."""
    sdists = cache / "sdist"
    pattern = f"llama_cpp_python-{version or '*'}.tar.gz"
    found = sorted(glob.glob(str(sdists / pattern)))
    if not found:
        sdists.mkdir(parents=True, exist_ok=True)
        spec = "llama-cpp-python" + (f"=={version}" if version else "")
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--dest", str(sdists), spec]
        say(" ".join(cmd))
        subprocess.run(cmd, check=True)
        found = sorted(glob.glob(str(sdists / pattern)))
    if not found:
        raise SystemExit(f"no sdist matching {pattern} in {sdists}")
    sdist = pathlib.Path(found[-1])
    name = sdist.name.removesuffix(".tar.gz")
    ver = name.split("-", 1)[1]
    top = cache / "src" / name
    if not (top / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        say(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tf:
            tf.extractall(cache / "src", filter="data")
    tree = top / "vendor" / "llama.cpp"
    commit = None
    changelog = (top / "CHANGELOG.md").read_text(errors="replace")
    m = re.search(rf"## \[{re.escape(ver)}\](.*?)(?=\n## \[|\Z)", changelog, re.S)
    if m:
        c = re.search(r"llama\.cpp@([0-9a-f]{7,40})", m.group(1))
        commit = c.group(1) if c else None
    return {"sdist": sdist.name, "llama_cpp_python": ver, "llama_cpp_commit": commit,
            "tree": str(tree)}


def build(cache: pathlib.Path, src: dict, jobs: int, amx: bool) -> dict:
    """CMake Release build of TOOLS for this CPU in ``cache/build-<version>`` (skipped when
    the stamp says the same arguments built them already)."""
    bdir = cache / f"build-{src['llama_cpp_python']}"
    args = [*CMAKE_ARGS]
    if not amx:
        args += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    if src["llama_cpp_commit"]:
        args.append(f"-DLLAMA_BUILD_COMMIT={src['llama_cpp_commit']}")
    stamp = bdir / "build-stamp.json"
    bins = {t: bdir / "bin" / t for t in TOOLS}
    if stamp.is_file() and all(b.is_file() for b in bins.values()):
        info = json.loads(stamp.read_text())
        if info.get("cmake_args") == args and info.get("tools") == list(TOOLS):
            say(f"llama.cpp already built in {bdir}")
            return {**info, "skipped": True, "bin": {t: str(b) for t, b in bins.items()}}
    configure = ["nice", "-n", "10", "cmake", "-S", src["tree"], "-B", str(bdir), *args]
    compile_ = ["nice", "-n", "10", "cmake", "--build", str(bdir), "--config", "Release",
                f"-j{jobs}", "--target", *TOOLS]
    t0 = time.time()
    bdir.mkdir(parents=True, exist_ok=True)
    with open(bdir / "configure.log", "w") as log:
        say(shlex.join(configure))
        subprocess.run(configure, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(bdir / "build.log", "w") as log:
        say(shlex.join(compile_) + f"  (log: {bdir / 'build.log'}; 10-20 min on 2 cores)")
        subprocess.run(compile_, check=True, stdout=log, stderr=subprocess.STDOUT)
    info = {"cmake_args": args, "tools": list(TOOLS), "configure": shlex.join(configure),
            "build": shlex.join(compile_), "build_s": round(time.time() - t0, 1),
            "built_at": datetime.datetime.now().isoformat(timespec="seconds")}
    cfg = (bdir / "configure.log").read_text(errors="replace")
    for key, pat in (("ggml_version", r"ggml version: (\S+)"), ("ggml_commit", r"ggml commit:\s+(\S+)"),
                     ("cpu_variant", r"Adding CPU backend variant (.*)")):
        m = re.search(pat, cfg)
        info[key] = m.group(1).strip() if m else None
    stamp.write_text(json.dumps(info, indent=1))
    return {**info, "skipped": False, "bin": {t: str(b) for t, b in bins.items()}}


# ---------------------------------------------------------------------------------------------
# 3: the GGUF files


def gguf_files(cache: pathlib.Path) -> dict[str, str]:
    """The default pair's GGUF files, assembled from their wheels and checked once."""
    sys.path.insert(0, str(ROOT))
    from speccascade_fast import models

    out = {}
    for role, name in (("drafter", models.DEFAULT_DRAFTER), ("verifier", models.DEFAULT_VERIFIER)):
        src = models.SOURCES[name]
        dest = cache / "gguf" / f"{name}.Q4_K_M.gguf"
        ok = cache / "gguf" / f"{name}.sha256"
        if not (dest.is_file() and dest.stat().st_size == src.size and ok.is_file()
                and ok.read_text().strip() == src.sha256):
            dest.parent.mkdir(parents=True, exist_ok=True)
            say(f"assembling {dest} from {len(src.dists)} wheel(s) (sha256 checked)")
            models._copy_and_hash(models._locate_parts(src), dest, src, progress=False)
            ok.write_text(src.sha256 + "\n")
        out[role] = str(dest)
    return out


# ---------------------------------------------------------------------------------------------
# 4: the prompts and the processes


def write_prompts(out: pathlib.Path, n: int) -> list[dict]:
    """The first ``n`` HumanEval prompts as ``speccascade bench`` takes them (raw completion
    text), one file each (plus the newline ``-f`` drops, so that llama.cpp reads exactly the
    prompt), with their token count under our tokenizer."""
    sys.path.insert(0, str(ROOT))
    from speccascade_fast.eval.tasks.humaneval import HumanEval

    task = HumanEval()
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = []
    tok = None
    try:
        from transformers import AutoTokenizer

        from speccascade_fast.models import DEFAULT_VERIFIER, cache_dir

        tok = AutoTokenizer.from_pretrained(cache_dir() / DEFAULT_VERIFIER)
    except Exception as e:  # noqa: BLE001 - the count is informative only
        say(f"no tokenizer for the prompts' token counts ({type(e).__name__})")
    for i, ex in enumerate(task.examples(n)):
        text = task.build_prompt(ex)
        path = folder / f"p{i}.txt"
        path.write_text(text + "\n")  # llama.cpp's -f drops a file's last newline
        prompts.append({"file": str(path), "task_id": ex.data.get("task_id"),
                        "tokens_ours": len(tok(text).input_ids) if tok else None})
    return prompts


def run_process(cmd: list[str], log: pathlib.Path, env: dict | None = None,
                cwd: str | pathlib.Path | None = None) -> dict:
    """Run ``cmd`` with stdout+stderr to ``log``; wall time, peak RSS (ru_maxrss), exit code
    and the load average before it."""
    before = loadavg()
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             cwd=cwd, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": shlex.join(cmd), "log": str(log), "rc": p.returncode,
            "wall_s": round(time.perf_counter() - t0, 3),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "loadavg_before": before}


_P = r"(?:llama_perf_context_print|common_perf_print):\s+"
_PERF = {
    "load_ms": _P + r"load time =\s+([\d.]+) ms",
    "prompt_ms": _P + r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens",
    "eval_ms": _P + r"eval time =\s+([\d.]+) ms /\s+(\d+) runs",
}


def parse_completion(text: str) -> dict:
    r = {}
    for key, pat in _PERF.items():
        m = re.findall(pat, text)
        if m:  # llama-completion prints one block (the target's)
            last = m[-1]
            r[key] = float(last[0] if isinstance(last, tuple) else last)
            if isinstance(last, tuple):
                r[key.replace("_ms", "_n")] = int(last[1])
    if "eval_ms" in r and r.get("eval_n"):
        r["decode_tok_s"] = r["eval_n"] / (r["eval_ms"] / 1e3)
        r["gen_tokens"] = r["eval_n"] + 1  # the first token comes from the prompt's pass
        r["gen_s"] = (r["eval_ms"] + r.get("prompt_ms", 0.0)) / 1e3
    return r


def parse_speculative(text: str) -> dict:
    r = {}
    m = re.search(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds", text)
    if m:
        r["prompt_n"], r["prompt_ms"] = int(m.group(1)), float(m.group(2)) * 1e3
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", text)
    if m:
        r["gen_tokens"], r["decode_s"] = int(m.group(1)), float(m.group(2))
        r["decode_tok_s"] = float(m.group(3))
        r["gen_s"] = r["decode_s"] + r.get("prompt_ms", 0.0) / 1e3
    for key in ("n_draft", "n_predict", "n_drafted", "n_accept"):
        m = re.search(rf"\b{key}\s+=\s+(\d+)", text)
        if m:
            r[key] = int(m.group(1))
    return r


def sampling_args(temp: float, seed: int) -> list[str]:
    if temp == 0:
        return ["--temp", "0"]
    return ["--temp", str(temp), "--top-k", "0", "--top-p", "1", "--min-p", "0",
            "--seed", str(seed)]


def llama_jobs(args, bins: dict, gguf: dict, prompts: list[dict], threads: int,
               mean_prompt: int) -> list[dict]:
    """The llama.cpp configurations at ``threads``: each a list of commands (one per prompt)."""
    jobs = []
    n = str(args.max_new_tokens)
    common = ["-t", str(threads), "-tb", str(threads), "-c", str(args.ctx), "--ignore-eos",
              "-n", n]
    roles = ("verifier", "drafter") if args.bench_drafter else ("verifier",)
    for role in roles if args.llama_bench else ():
        jobs.append({"name": f"llama-bench {role}", "kind": "bench", "threads": threads,
                     "temp": None, "cmds": [[
                         bins["llama-bench"], "-m", gguf[role], "-t", str(threads),
                         "-p", str(mean_prompt), "-n", n, "-r", str(args.bench_reps),
                         "-o", "json"]]})
    for temp in args.temps:
        jobs.append({"name": f"llama.cpp verifier T={temp:g}", "kind": "completion",
                     "threads": threads, "temp": temp, "cmds": [[
                         bins["llama-completion"], "-m", gguf["verifier"], "-f", p["file"],
                         "-no-cnv", "--no-display-prompt", *common,
                         *sampling_args(temp, args.seed + i)]
                         for i, p in enumerate(prompts)]})
        for d in args.draft_max if temp == 0 else args.draft_max_t1:
            dflag = [] if d == "default" else ["--spec-draft-n-max", d]
            jobs.append({"name": f"llama.cpp spec draft-max={d} T={temp:g}", "kind": "spec",
                         "threads": threads, "temp": temp, "draft_max": d, "cmds": [[
                             bins["llama-speculative-simple"], "-m", gguf["verifier"],
                             "-md", gguf["drafter"], "--spec-type", "draft-simple",
                             "-f", p["file"], *common,
                             "-td", str(threads), "-tbd", str(threads), *dflag,
                             *sampling_args(temp, args.seed + i)]
                             for i, p in enumerate(prompts)]})
    return jobs


def run_llama_job(job: dict, out: pathlib.Path, rnd: int) -> dict:
    procs = []
    for i, cmd in enumerate(job["cmds"]):
        slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", job["name"])
        log = out / "logs" / f"r{rnd}-t{job['threads']}-{slug}-p{i}.log"
        say(f"round {rnd}: {job['name']}, {job['threads']} thread(s), prompt {i}")
        proc = run_process(cmd, log)
        text = log.read_text(errors="replace")
        if job["kind"] == "bench":
            m = re.search(r"^\[.*\]", text, re.S | re.M)
            try:
                proc["bench"] = [{k: r.get(k) for k in (
                    "n_prompt", "n_gen", "n_threads", "avg_ts", "stddev_ts", "samples_ts",
                    "model_type", "model_size", "build_commit", "build_number", "cpu_info")}
                    for r in json.loads(m.group(0))] if m else None
            except json.JSONDecodeError:
                proc["bench"] = None
        elif job["kind"] == "completion":
            proc.update(parse_completion(text))
        else:
            proc.update(parse_speculative(text))
        if proc["rc"] != 0:
            say(f"  exit code {proc['rc']}: see {log}")
        procs.append(proc)
    return {k: v for k, v in job.items() if k != "cmds"} | {"round": rnd, "procs": procs}


def ours_tree(cache: pathlib.Path, commit: str | None) -> dict:
    """Where our engine runs from: this working tree as it is (``commit`` None; recorded with
    whether it differs from HEAD), or a snapshot of ``commit`` (``git archive``) in
    ``cache/ours-<sha>`` with this tree's compiled extension copied in, so that others' edits
    to the working tree during the run change nothing."""
    git = ["git", "-C", str(ROOT)]
    if commit is None:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no",
                                "speccascade_fast"], capture_output=True, text=True).stdout
        return {"path": str(ROOT), "commit": head.stdout.strip(), "dirty": bool(dirty.strip())}
    sha = subprocess.run([*git, "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = cache / f"ours-{sha[:12]}"
    if not (dest / "speccascade_fast" / "__init__.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        say(f"snapshot of {sha[:12]} in {dest}")
        archive = subprocess.Popen([*git, "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
        archive.wait()
        for so in (ROOT / "speccascade_fast").glob("*.so"):
            (dest / "speccascade_fast" / so.name).write_bytes(so.read_bytes())
    return {"path": str(dest), "commit": sha, "dirty": False}


def run_ours_job(args, out: pathlib.Path, threads: int, rnd: int, weights: str = "q4") -> dict:
    tag = "" if weights == "q4" else f"-{weights}"
    folder = (out / "ours" / f"r{rnd}-t{threads}{tag}").resolve()
    cmd = [sys.executable, "-m", "speccascade_fast", "bench", "--weights", weights,
           "--batch", "1", "--no-hf", "--configs", args.our_configs,
           "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--rounds", "1", "--threads", str(threads), "--out", str(folder)]
    say(f"round {rnd}: ours ({args.our_configs}, {weights}), {threads} thread(s)")
    tree = args.tree["path"]
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = run_process(cmd, out / "logs" / f"r{rnd}-t{threads}-ours{tag}.log", env=env,
                       cwd=tree)
    result = {"name": "ours", "kind": "ours", "threads": threads, "round": rnd,
              "weights": weights, "procs": [proc]}
    e2e = folder / "e2e.json"
    if proc["rc"] == 0 and e2e.is_file():
        data = json.loads(e2e.read_text())
        proc["rows"] = [{"name": r["name"], "tokens": r["tokens"], "wall_s": r["wall_s"],
                         "prefill_s": r["extra"].get("prefill_s"),
                         "verifier_calls": r.get("verifier_calls")} for r in data["rows"]]
        proc["memory"] = data.get("memory")
        proc["greedy_agreement"] = data.get("greedy_agreement")
    else:
        say(f"  ours failed (exit code {proc['rc']}): see {proc['log']}")
    return result


# ---------------------------------------------------------------------------------------------
# 5: totals and the table


def summarize(results: list[dict]) -> list[dict]:
    """One row per configuration and thread count: totals over prompts and rounds."""
    rows: dict[tuple, dict] = {}

    def row(name, threads, **kw):
        r = rows.setdefault((name, threads), {"config": name, "threads": threads, "tokens": 0,
                                              "decode_s": 0.0, "gen_s": 0.0, "rounds": set(),
                                              "peak_rss_mib": 0.0, "loadavg_before": [],
                                              "process_wall_s": [], "failed": 0, **kw})
        return r

    for res in results:
        t = res["threads"]
        for p in res["procs"]:
            if res["kind"] == "ours":
                w = res.get("weights", "q4")
                for o in p.get("rows", []):
                    r = row(o["name"] if w == "q4" else f"{o['name']} [{w}]", t, tool="ours")
                    r["tokens"] += o["tokens"]
                    r["decode_s"] += o["wall_s"] - (o["prefill_s"] or 0.0)
                    r["gen_s"] += o["wall_s"]
                    if o.get("verifier_calls"):
                        r["verifier_calls"] = r.get("verifier_calls", 0) + o["verifier_calls"]
                    _proc_stats(r, p, res["round"])
                if not p.get("rows"):
                    row("ours", t, tool="ours")["failed"] += 1
                continue
            if res["kind"] == "bench":
                for b in p.get("bench") or []:
                    test = f"pp{b['n_prompt']}" if b["n_prompt"] else f"tg{b['n_gen']}"
                    r = row(f"{res['name']} {test}", t, tool="llama-bench")
                    r.setdefault("samples_ts", []).extend(b.get("samples_ts") or [])
                    _proc_stats(r, p, res["round"])
                if not p.get("bench"):
                    row(res["name"], t, tool="llama-bench")["failed"] += 1
                continue
            r = row(res["name"], t, tool="llama.cpp")
            _proc_stats(r, p, res["round"])
            if p["rc"] != 0 or "decode_tok_s" not in p:
                r["failed"] += 1
                continue
            if res["kind"] == "completion":
                r["tokens"] += p["eval_n"]
                r["decode_s"] += p["eval_ms"] / 1e3
                r["gen_tokens"] = r.get("gen_tokens", 0) + p["gen_tokens"]
            else:
                r["tokens"] += p["gen_tokens"]
                r["decode_s"] += p["decode_s"]
                r["gen_tokens"] = r.get("gen_tokens", 0) + p["gen_tokens"]
                for k in ("n_drafted", "n_accept"):
                    r[k] = r.get(k, 0) + p.get(k, 0)
            r["gen_s"] += p["gen_s"]

    out = []
    for r in rows.values():
        r["rounds"] = sorted(r["rounds"])
        if "samples_ts" in r:  # llama-bench: the mean of its samples over all repetitions
            s = r["samples_ts"]
            r["decode_tok_s"] = round(sum(s) / len(s), 3) if s else None
        elif r["decode_s"] > 0:
            r["decode_tok_s"] = round(r["tokens"] / r["decode_s"], 3)
            gen_tokens = r.get("gen_tokens", r["tokens"])
            r["with_prefill_tok_s"] = round(gen_tokens / r["gen_s"], 3) if r["gen_s"] else None
        if r.get("verifier_calls"):
            r["tokens_per_verifier_call"] = round(r["tokens"] / r["verifier_calls"], 3)
        if r.get("n_drafted"):
            r["accept_rate"] = round(r["n_accept"] / r["n_drafted"], 3)
        r["decode_s"], r["gen_s"] = round(r["decode_s"], 3), round(r["gen_s"], 3)
        out.append(r)
    best = best_llamacpp(out)
    for r in out:
        if best and r.get("decode_tok_s") and " pp" not in r["config"]:
            r["vs_llamacpp_best"] = round(r["decode_tok_s"] / best["decode_tok_s"], 3)
    return out


def best_llamacpp(rows: list[dict]) -> dict | None:
    """llama.cpp's fastest decoding configuration on the real prompts (any thread count)."""
    real = [r for r in rows if r["tool"] == "llama.cpp" and r.get("decode_tok_s")]
    return max(real, key=lambda r: r["decode_tok_s"], default=None)


def _proc_stats(r: dict, p: dict, rnd: int) -> None:
    r["rounds"].add(rnd)
    r["peak_rss_mib"] = max(r["peak_rss_mib"], p["peak_rss_mib"])
    r["process_wall_s"].append(p["wall_s"])
    if p["loadavg_before"] and p["loadavg_before"] not in r["loadavg_before"]:
        r["loadavg_before"].append(p["loadavg_before"])


def markdown(rows: list[dict], best: dict | None) -> str:
    cols = [("config", "configuration"), ("threads", "threads"),
            ("decode_tok_s", "decode tok/s"), ("with_prefill_tok_s", "with prefill, tok/s"),
            ("vs_llamacpp_best", "decode vs llama.cpp's best"),
            ("tokens", "tokens decoded"), ("accept", "accepted drafts / tokens per call"),
            ("peak_rss_mib", "peak RSS, MiB"), ("process_wall_s", "process wall, s"),
            ("loadavg_before", "load average before its processes (1 min: min–max)"),
            ("failed", "failed processes")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    order = {"ours": 0, "llama.cpp": 1, "llama-bench": 2}
    for r in sorted(rows, key=lambda r: (order[r["tool"]], r["threads"], r["config"])):
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if key == "accept":
                v = (f"{r['accept_rate']:.0%}" if "accept_rate" in r else
                     f"{r['tokens_per_verifier_call']}" if "tokens_per_verifier_call" in r
                     else "")
            elif key == "process_wall_s":
                v = f"{sum(v):.0f} ({len(v)})" if v else ""
            elif key == "loadavg_before":
                one = [la[0] for la in v]
                v = f"{min(one):.1f}–{max(one):.1f}" if one else ""
            elif key == "config" and r["tool"] == "llama-bench":
                v = f"{v} (synthetic tokens)"
            elif key == "tokens" and r["tool"] == "llama-bench":
                v = ""
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if best:
        lines.append("")
        lines.append(f"llama.cpp's best decoding configuration on the prompts: {best['config']}, "
                     f"{best['threads']} thread(s), {best['decode_tok_s']} tok/s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder for llamacpp.json, llamacpp.md, logs/, prompts/")
    p.add_argument("--cache", type=pathlib.Path, default=None,
                   help="sdist, source, build and GGUF files (default: "
                        "~/.cache/speccascade_fast/llamacpp)")
    p.add_argument("--llama-cpp-python", default=None,
                   help="the sdist's version (default: the newest pip finds)")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--jobs", type=int, default=2, help="build jobs (default: 2)")
    p.add_argument("--amx", action="store_true",
                   help="keep -march=native's AMX (default: -mno-amx-*: ggml's AMX kernels die "
                        "with SIGILL on this machine)")
    p.add_argument("--threads", default="2,1", help="comma-separated (default: 2,1)")
    p.add_argument("--prompts", type=int, default=2, help="HumanEval prompts (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temps", default="0,1", help="comma-separated temperatures (default: 0,1)")
    p.add_argument("--draft-max", default="default,5",
                   help="llama-speculative-simple draft lengths; 'default' = the tool's own "
                        "at T = 0 (default: default,5)")
    p.add_argument("--draft-max-t1", default="default",
                   help="the draft lengths at T > 0 (default: default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bench-reps", type=int, default=3, help="llama-bench -r (default: 3)")
    p.add_argument("--no-bench-drafter", dest="bench_drafter", action="store_false",
                   help="skip llama-bench on the drafter")
    p.add_argument("--no-llama-bench", dest="llama_bench", action="store_false",
                   help="skip llama-bench altogether (the real prompts only)")
    p.add_argument("--ctx", type=int, default=1024, help="llama.cpp context (default: 1024)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-ours", dest="ours", action="store_false",
                   help="skip our engine's processes")
    p.add_argument("--our-weights", default="q4",
                   help="comma-separated --weights of our runs, each its own process per round "
                        "(q4, q4a8; rows of weights other than q4 are named 'config [weights]'; "
                        "default: q4)")
    p.add_argument("--our-configs", default="verifier,spec-greedy",
                   help="speccascade bench --configs (default: verifier,spec-greedy)")
    p.add_argument("--ours-commit", default=None,
                   help="run our engine from a snapshot of this commit (default: this working "
                        "tree as it is)")
    args = p.parse_args(argv)
    args.temps = [float(t) for t in args.temps.split(",")]
    args.draft_max = args.draft_max.split(",")
    args.draft_max_t1 = args.draft_max_t1.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    if not args.build_only and not args.out:
        p.error("--out is required unless --build-only")
    bad = [w for w in args.our_weights.split(",") if w not in ("q4", "q4a8")]
    if bad:
        p.error(f"argument --our-weights: {bad[0]!r} is not one of q4, q4a8")
    cache = (args.cache or default_cache()).expanduser()
    started = time.time()
    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv, "loadavg_start": loadavg(), "cpu_count": os.cpu_count()}
    src = fetch_source(cache, args.llama_cpp_python)
    built = build(cache, src, args.jobs, args.amx)
    say(f"llama-cpp-python {src['llama_cpp_python']}, llama.cpp {src['llama_cpp_commit']}, "
        f"binaries in {pathlib.Path(built['bin']['llama-bench']).parent}")
    if args.build_only:
        return 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = gguf_files(cache)
    prompts = write_prompts(out, args.prompts)
    args.tree = ours_tree(cache, args.ours_commit) if args.ours else None
    counted = [q["tokens_ours"] for q in prompts if q["tokens_ours"]]
    mean_prompt = round(sum(counted) / len(counted)) if counted else 128
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        meta["cpu_model"] = re.search(r"Model name:\s*(.*)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        meta["cpu_model"] = None
    meta.update(ours_tree=args.tree, source=src, build={k: v for k, v in built.items() if k != "bin"}, gguf=gguf,
                prompts=prompts, mean_prompt_tokens=mean_prompt,
                settings={k: v for k, v in vars(args).items() if k not in ("cache", "tree")} | {
                    "threads": threads, "cache": str(cache)})

    def save(results, rows=None, table=None):
        data = {**meta, "results": results, "rows": rows,
                "elapsed_s": round(time.time() - started, 1)}
        (out / "llamacpp.json").write_text(json.dumps(data, indent=1))
        if table:
            (out / "llamacpp.md").write_text(table + "\n")

    results: list[dict] = []
    for rnd in range(args.rounds):
        plan = []
        for t in threads:
            plan += [("llama", j) for j in llama_jobs(args, built["bin"], gguf, prompts, t,
                                                      mean_prompt)]
            if args.ours:
                plan += [("ours", (t, w)) for w in args.our_weights.split(",")]
        if rnd % 2:
            plan.reverse()
        for kind, job in plan:
            if kind == "ours":
                results.append(run_ours_job(args, out, job[0], rnd, job[1]))
            else:
                results.append(run_llama_job(job, out, rnd))
            rows = summarize(results)  # the table so far after every process: a run cut
            save(results, rows, markdown(rows, best_llamacpp(rows)))  # short still has one
    rows = summarize(results)
    table = markdown(rows, best_llamacpp(rows))
    meta["loadavg_end"] = loadavg()
    meta["finished"] = True
    save(results, rows, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
