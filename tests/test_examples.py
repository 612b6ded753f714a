"""The PyTorch examples run a few steps (CPU here; the same code picks CUDA when present)."""
import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sela_torch_runs_two_epochs(capsys):
    mod = _load("sela_torch")
    nmi = mod.main(["--epochs", "2"])
    out = capsys.readouterr().out
    assert out.count("epoch ") == 2
    assert 0.0 <= nmi <= 1.0


def test_swav_sinkhorn_matches_swav_loop(capsys):
    mod = _load("swav_sinkhorn")
    diffs = mod.main(["--batch", "256", "--prototypes", "100", "--repeats", "1"])
    assert diffs[torch.float64] < 1e-12
    assert diffs[torch.float32] < 1e-5
    assert "max |ours - SwAV|" in capsys.readouterr().out


def test_swav_drop_in_contract():
    mod = _load("swav_sinkhorn")
    out = mod.random_scores(64, 40, torch.device("cpu"), torch.float64, seed=1)
    q = mod.distributed_sinkhorn(out)
    assert isinstance(q, torch.Tensor) and q.shape == (64, 40)
    torch.testing.assert_close(q.sum(1), torch.ones(64, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(q, mod.swav_distributed_sinkhorn(out.clone()),
                               rtol=0, atol=1e-12)


def test_fit_point_cloud_descends(capsys):
    mod = _load("fit_point_cloud")
    losses = mod.main(["--n", "120", "--steps", "6"])
    assert "divergence" in capsys.readouterr().out
    assert losses[-1] < 1e-2 * losses[0]
