"""bench/report.py: the README tables of the verification microbenchmarks, CPU and GPU forms."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(backend, median, minimum, gpu_us=None, **shape):
    info = dict(rule="spec", B=1, gamma=5, V=1000, backend=backend, dtype="bf16",
                logit_bytes=24_000, **shape)
    if gpu_us is not None:
        info["gpu_us"] = gpu_us
    return {"group": "g", "extra_info": info, "stats": {"median": median, "min": minimum}}


def _write(tmp_path, benchmarks):
    path = tmp_path / "out.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return str(path)


def test_cpu_table_ratios_and_read_multiple(tmp_path, capsys):
    bw = {"group": "memory bandwidth", "extra_info": {"mem_bw_gbs": 24.0}, "stats": {}}
    path = _write(tmp_path, [bw, _bench("cpu", 2e-6, 1e-6), _bench("reference", 200e-6, 100e-6),
                             _bench("eager", 20e-6, 10e-6)])
    assert _report().main([path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "24.0 GB/s" in lines[0]
    cpu = next(line for line in lines if "| cpu |" in line)
    cells = [c.strip() for c in cpu.strip("|").split("|")]
    # median 2 µs: 24,000 B / 2 µs = 12 GB/s; reading once at 24 GB/s takes 1 µs: 2.0 x read;
    # medians 200 µs / 2 µs = 100x the reference's speed, 20 µs / 2 µs = 10x the eager chain's
    assert cells[6:] == ["2.0", "1.0", "12.0", "2.0", "100.0×", "10.0×"]
    order = [line.split("|")[6].strip() for line in lines if line.startswith("| spec")]
    assert order == ["cpu", "eager", "reference"]


def test_cpu_table_on_the_min_with_the_rows_own_bandwidth(tmp_path, capsys):
    """``--stat min``: GB/s, '× read' and the ratios from the min; the bandwidth recorded in the
    rows themselves (no memory-bandwidth benchmark)."""
    path = _write(tmp_path, [_bench("cpu", 300e-6, 240e-6, mem_bw_gbs=20.0),
                             _bench("reference", 6e-3, 4.8e-3, mem_bw_gbs=20.0),
                             _bench("eager", 1.5e-3, 1.44e-3, mem_bw_gbs=20.0)])
    assert _report().main([path, "--stat", "min"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "20.0 GB/s" in lines[0] and "GB/s (min)" in lines[2]
    cells = {c[5]: c[6:] for c in ([c.strip() for c in x.strip("|").split("|")]
                                   for x in lines if x.startswith("| spec"))}
    # min 240 µs: 24,000 B / 240 µs = 0.1 GB/s; reading once at 20 GB/s takes 1.2 µs:
    # 240 / 1.2 = 200x read; mins 4,800 µs / 240 µs = 20x the reference, 1,440 / 240 = 6x eager
    assert cells["cpu"] == ["300", "240", "0.1", "200.0", "20.0×", "6.0×"]
    # 4,800 / 1.2 = 4,000x read; against itself 1.0x; eager: 1,440 / 4,800 = 0.3x
    assert cells["reference"] == ["6,000", "4,800", "0.0", "4000.0", "1.0×", "0.3×"]
    assert cells["eager"][:2] == ["1,500", "1,440"]


def test_gpu_table_uses_cuda_event_times(tmp_path, capsys):
    path = _write(tmp_path, [
        _bench("eager", 90e-6, 80e-6, gpu_us=60.0), _bench("cuda-graph", 20e-6, 15e-6, gpu_us=6.0),
        _bench("triton", 40e-6, 30e-6, gpu_us=12.0), _bench("reference", 5e-3, 4e-3, gpu_us=3000.0),
    ])
    assert _report().main([path, "--stat", "gpu_us"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "GPU µs" in lines[0] and lines[1].count("|---") == 13
    graph = [c.strip() for c in next(x for x in lines if "cuda-graph" in x).strip("|").split("|")]
    # GPU 6 µs: 24,000 B / 6 µs = 4 GB/s; no bandwidth measured: no '× read';
    # GPU 3,000 µs / 6 µs = 500x the reference, 60 µs / 6 µs = 10x eager
    assert graph[6:] == ["20.0", "15.0", "6.0", "4.0", "", "500.0×", "10.0×"]
    order = [line.split("|")[6].strip() for line in lines if line.startswith("| spec")]
    assert order == ["cuda-graph", "triton", "eager", "reference"]


def test_gpu_stat_on_cpu_results_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path, [_bench("cpu", 2e-6, 1e-6)])
    assert _report().main([path, "--stat", "gpu_us"]) == 2
    assert "needs bench_verify_gpu.py results" in capsys.readouterr().err


def test_no_results(tmp_path, capsys):
    assert _report().main([_write(tmp_path, [])]) == 1
    with pytest.raises(SystemExit):
        _report().main([_write(tmp_path, []), "--stat", "p99"])


def _sample(impl, gpu_us, R=1, V=151936, top_p=None, kind="sample"):
    info = dict(kind=kind, impl=impl, R=R, V=V, top_p=top_p, gpu_us=gpu_us, dtype="bf16")
    return {"group": "s", "extra_info": info, "stats": {"median": gpu_us * 2e-6, "min": 0.0}}


def test_sampler_table_compares_like_with_like(tmp_path, capsys):
    """bench_sample_gpu.py's rows: the graph replay against the torch formula's graph replay,
    the eager call against the eager formula, per (kind, R, V, top_p); the keep-bound rows
    after the sampler's, against the torch bounds."""
    path = _write(tmp_path, [_sample("search-graph", 30.0, top_p=0.9, kind="keep_bounds"),
                             _sample("torch-graph", 150.0, top_p=0.9, kind="keep_bounds"),
                             _sample("torch", 400.0), _sample("triton", 20.0),
                             _sample("torch-graph", 90.0), _sample("triton-graph", 6.0),
                             _sample("triton", 25.0, top_p=0.9)])
    assert _report().main([path, "--stat", "gpu_us"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| what | R | V | top_p | impl | GPU µs")
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]
    assert [r[3:5] for r in rows] == [["–", "triton-graph"], ["–", "torch-graph"],
                                      ["–", "triton"], ["–", "torch"], ["0.9", "triton"],
                                      ["0.9", "search-graph"], ["0.9", "torch-graph"]]
    assert rows[0][0] == "sample" and rows[5][0] == "keep bounds"
    assert rows[0][5:] == ["6.0", "12.0", "15.0×"]  # 90 / 6
    assert rows[2][7] == "20.0×" and rows[3][7] == "1.0×"  # 400 / 20; torch against itself
    assert rows[4][7] == ""  # no torch row for the sampler at top_p = 0.9
    assert rows[5][7] == "5.0×"  # the keep bounds' own torch row: 150 / 30
