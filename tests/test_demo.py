"""The ``sinkhorn-ot demo`` command: exit code, output and figure, and its library entry."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from sinkhorn_ot.__main__ import main  # noqa: E402
from sinkhorn_ot.demo import hungarian_accuracy, run_demo  # noqa: E402


def test_demo_command_runs(tmp_path):
    out = tmp_path / "fig.png"
    proc = subprocess.run(
        [sys.executable, "-m", "sinkhorn_ot", "demo", "--rounds", "2", "--epochs", "1",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "NMI" in text and "k-means" in text and "final cluster sizes" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reproducible_and_balanced():
    kw = dict(rounds=2, epochs=1, overcluster=(), out=None, progress=False,
              echo=lambda s: None)
    r1, r2 = run_demo(**kw), run_demo(**kw)
    np.testing.assert_array_equal(r1.labels, r2.labels)
    assert [h["nmi"] for h in r1.history] == [h["nmi"] for h in r2.history]
    sizes = np.asarray(r1.history[-1]["sizes"])
    # argmax labels of early, diffuse outputs are only roughly balanced (1797 / 10 ~ 180)
    assert sizes.sum() == 1797 and sizes.min() > 100 and sizes.max() < 260
    assert set(r1.kmeans) == {"nmi", "ari", "acc"}


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_hungarian_accuracy():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert hungarian_accuracy(y, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    assert hungarian_accuracy(y, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(4 / 6)
