"""The ``sinkhorn-ot demo`` command: exit code, output and figure, its library entry, and (slow)
what it promises: self-labelling beats k-means on load_digits with balanced clusters."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from sinkhorn_ot.__main__ import main  # noqa: E402
from sinkhorn_ot.demo import augment, hungarian_accuracy, run_demo  # noqa: E402

QUIET = dict(out=None, progress=False, echo=lambda s: None)


def test_demo_command_runs(tmp_path):
    out = tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, "-m", "sinkhorn_ot", "demo", "--rounds", "2", "--epochs", "1",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "NMI" in text and "k-means" in text and "final cluster sizes" in text
    assert text.count("columns:") == 1          # the legend, once
    assert "nan" not in text.lower()
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][-1] == "-"  # no loss before training
    assert "lam=25 (the API default)" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reproducible_and_balanced():
    kw = dict(rounds=2, epochs=1, **QUIET)
    r1, r2 = run_demo(**kw), run_demo(**kw)
    np.testing.assert_array_equal(r1.labels, r2.labels)
    assert [h["nmi"] for h in r1.history] == [h["nmi"] for h in r2.history]
    sizes = np.asarray(r1.history[-1]["sizes"])
    np.testing.assert_array_equal(sizes, np.bincount(r1.labels, minlength=10))
    # argmax labels of early, diffuse outputs are only roughly balanced (1797 / 10 ~ 180)
    assert sizes.sum() == 1797 and sizes.min() > 100 and sizes.max() < 260
    assert set(r1.kmeans) == {"nmi", "ari", "acc"} and sum(r1.kmeans_sizes) == 1797
    assert r1.history[0]["loss"] is None and np.isfinite(r1.history[1]["loss"])


def test_augment_keeps_shape_range_and_ink():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (50, 8, 8))
    out = augment(images, rng)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1.2
    # no warp, no ink change, no noise: the images come back unchanged
    same = augment(images, rng, rotate=0, scale=0, shear=0, shift=0, ink=0, noise=0)
    np.testing.assert_allclose(same, images, atol=1e-12)


@pytest.mark.slow
def test_default_demo_beats_kmeans_with_balanced_clusters():
    """The defaults (what `sinkhorn-ot demo` runs, seed 0): the numbers the README quotes."""
    r = run_demo(**QUIET)
    final = r.history[-1]
    assert final["nmi"] >= 0.80 and final["acc"] >= 0.88
    assert final["nmi"] > r.kmeans["nmi"] + 0.05 and final["acc"] > r.kmeans["acc"] + 0.05
    sizes = np.asarray(final["sizes"])
    assert np.abs(sizes - 1797 / 10).max() <= 3


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_hungarian_accuracy():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert hungarian_accuracy(y, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    assert hungarian_accuracy(y, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(4 / 6)
