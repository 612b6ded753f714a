"""Smoke tests of the benchmark scripts (benchmarks/*.py --quick on tiny sizes), so that they
cannot rot.  They check that each script runs, prints its table and writes its section of a
results file (a temporary copy, never benchmarks/RESULTS.md); they time nothing."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
HAVE_OTT = all(importlib.util.find_spec(m) is not None for m in ("jax", "ott"))

pytest.importorskip("ot")          # POT: every script compares against it


def run(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick",
                           "--n-threads", "1", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_cpu(tmp_path):
    res = tmp_path / "RESULTS.md"
    res.write_text("# Results\n\nkeep me\n")
    out = run("bench_cpu.py", "--sizes", "300x10", "--repeats", "1", "--results", str(res))
    assert "POT sinkhorn float64" in out and "streaming read" in out
    text = res.read_text()
    assert "keep me" in text and "<!-- BEGIN bench_cpu -->" in text
    # a second run replaces the section, it does not append another
    run("bench_cpu.py", "--sizes", "300x10", "--repeats", "1", "--results", str(res))
    assert res.read_text().count("<!-- BEGIN bench_cpu -->") == 1


def test_bench_batched(tmp_path):
    res = tmp_path / "RESULTS.md"
    out = run("bench_batched.py", "--results", str(res))
    assert "loop of POT ot.sinkhorn" in out and "4 targets" in out
    assert "<!-- BEGIN bench_batched -->" in res.read_text()


@pytest.mark.slow
def test_peers(tmp_path):
    res = tmp_path / "RESULTS.md"
    only = "sinkhorn_ot,POT sinkhorn,SeLa,SwAV" + (",OTT-JAX plain" if HAVE_OTT else "")
    extra = [] if HAVE_OTT else ["--no-ott"]
    out = run("peers.py", "--problems", "300x10,peaked", "--mlp-iter", "20", "--max-iter",
              "300", "--budget", "2", "--only", only, "--results", str(res), *extra)
    assert "#### random(300, 10)" in out and "#### peaked" in out
    assert "SeLa cpu_sk" in out and "SwAV-style" in out
    if HAVE_OTT:
        assert "OTT-JAX plain" in out
    assert "<!-- BEGIN peers -->" in res.read_text()


@pytest.mark.slow
def test_scaling(tmp_path):
    res = tmp_path / "RESULTS.md"
    png = tmp_path / "scaling.png"
    only = "POT sinkhorn,SeLa" + (",OTT-JAX plain" if HAVE_OTT else "")
    extra = [] if HAVE_OTT else ["--no-ott"]
    run("scaling.py", "--sizes", "200x10,400x10", "--max-iter", "500", "--only", only,
        "--out", str(png), "--results", str(res), *extra)
    assert png.stat().st_size > 1000
    assert "<!-- BEGIN scaling -->" in res.read_text()


def test_bench_codes(tmp_path):
    pytest.importorskip("torch")
    res = tmp_path / "RESULTS.md"
    out = run("bench_codes.py", "--results", str(res))
    for site in ("SwAV with a queue", "solo-learn", "lightly `swav_loss.sinkhorn`", "DINOv2",
                 "MSN", "lightly `msn_loss.sinkhorn`", "SeLa `optimize_L_sk`", "SeLaVi"):
        assert site in out, site
    import re
    agree = [float(v) for v in re.findall(r"labels ([0-9.]+)% equal", out)]
    assert len(agree) >= 3 and min(agree) >= 99.0, agree
    assert "<!-- BEGIN bench_codes -->" in res.read_text()


def test_bench_emd(tmp_path):
    res = tmp_path / "RESULTS.md"
    out = run("bench_emd.py", "--rounds", "1", "--results", str(res))
    for family in ("2-D euclidean, random marginals", "integer costs", "uniform"):
        assert family in out, family
    assert "<!-- BEGIN bench_emd -->" in res.read_text()


def test_bench_grad(tmp_path):
    pytest.importorskip("torch")
    res = tmp_path / "RESULTS.md"
    out = run("bench_grad.py", "--sizes", "500x20", "--results", str(res))
    assert "sinkhorn_cost forward + backward (C)" in out and "POT ot.sinkhorn2" in out
    assert "<!-- BEGIN bench_grad -->" in res.read_text()
