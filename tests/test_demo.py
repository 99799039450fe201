"""The training demo (python -m hcext.demo) end to end, in a tiny configuration.

One module-scoped run trains all three variants for a few steps with matplotlib made
unimportable; the tests check its metrics.json, its losses and the no-matplotlib path, then
draw the plots from it when matplotlib is installed.
"""

import json
import math
import sys

import pytest
import torch

from hcext import demo

STEPS, LAYERS = 30, 2
TINY = ["--steps", str(STEPS), "--dim", "32", "--layers", str(LAYERS), "--seq-len", "32", "--batch-size", "8",
        "--eval-every", "10", "--eval-batches", "2", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
        mp.setitem(sys.modules, "matplotlib.pyplot", None)
        returned = demo.main([*TINY, "--out", str(out)])
    return out, returned


PEAK_KINDS = {"peak RSS growth (VmHWM)", "ru_maxrss growth", "torch.cuda.max_memory_allocated growth"}


def _check_peak_memory(r):
    """The peak memory figure is a growth (not the process's whole footprint) of a plausible
    size for the shapes: at most the model state (fp32 weights, gradients and AdamW's two
    moments: 16 bytes a parameter), twice the activations saved for backward (those and their
    gradients) and 64 MiB for the allocator and lazily initialised runtime state; on CUDA, where
    the allocator counts exactly, at least the model state."""
    peak, state_mib = r["peak_memory_mib"], 16 * r["params"] / 2**20
    assert r["peak_memory_kind"] in PEAK_KINDS, r["peak_memory_kind"]
    assert math.isfinite(peak) and 0 <= peak <= state_mib + 2 * r["saved_activations_mib"] + 64, (
        peak, state_mib, r["saved_activations_mib"])
    if r["peak_memory_kind"].startswith("torch.cuda"):
        assert peak >= state_mib, (peak, state_mib)


def test_metrics_file_is_complete(run):
    out, returned = run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    assert set(metrics["variants"]) == set(demo.VARIANTS)
    assert metrics["data"]["bundled"] and metrics["data"]["val_bytes"] > 0
    for name, r in metrics["variants"].items():
        assert r["steps"] == list(range(1, STEPS + 1))
        assert len(r["train_loss"]) == len(r["grad_norm"]) == STEPS
        assert r["val_steps"] == [0, 10, 20, 30] and len(r["val_loss"]) == 4
        assert r["tokens_per_s"] > 0 and r["train_time_s"] > 0
        _check_peak_memory(r)
        assert r["saved_activations_mib"] > 0 and r["params"] > 0
        if name == "residual":
            assert r["amax_gain"] is None
        else:
            for key in ("forward", "backward", "single_forward", "single_backward"):
                gains = r["amax_gain"][key]
                assert len(gains) == 2 * LAYERS and all(math.isfinite(g) and g > 0 for g in gains)


def test_losses_finite_and_decreasing(run):
    _, metrics = run
    for name, r in metrics["variants"].items():
        losses = r["train_loss"] + r["val_loss"]
        assert all(math.isfinite(v) for v in losses), name
        first, last = sum(r["train_loss"][:3]) / 3, sum(r["train_loss"][-5:]) / 5
        assert last < first - 0.5, (name, first, last)
        assert r["val_loss"][-1] < r["val_loss"][0] - 0.5, (name, r["val_loss"])
        assert r["final_val_loss"] == r["val_loss"][-1]


def test_connections_are_the_library_modules(run):
    _, metrics = run
    connections = {name: r["connection"] for name, r in metrics["variants"].items()}
    assert connections == {"residual": "x + branch(x)", "hc": "hcext.nn.HyperConnection(kind='hc')",
                           "mhc": "hcext.nn.HyperConnection(kind='mhc')"}


def test_variants_start_from_the_same_network(run):
    # HC and mHC are initialised to equal a Pre-Norm network: same loss before training.
    _, metrics = run
    v0 = {name: r["val_loss"][0] for name, r in metrics["variants"].items()}
    assert v0["hc"] == pytest.approx(v0["residual"], abs=1e-4)
    assert v0["mhc"] == pytest.approx(v0["residual"], abs=1e-4)


def test_mhc_forward_gain_is_one(run):
    # Sinkhorn ends with a row normalisation: every H_res, and so every product, has rows summing to 1.
    _, metrics = run
    assert metrics["variants"]["mhc"]["amax_gain"]["forward"] == pytest.approx([1.0] * 2 * LAYERS, abs=1e-3)


def test_runs_without_matplotlib(run, capsys):
    out, _ = run
    assert not list(out.glob("*.png"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)
        demo.main(["--plot-from", str(out / "metrics.json")])
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not list(out.glob("*.png"))


def test_writes_plots_with_matplotlib(run, tmp_path):
    pytest.importorskip("matplotlib")
    out, metrics = run
    (tmp_path / "metrics.json").write_text((out / "metrics.json").read_text())
    demo.main(["--plot-from", str(tmp_path / "metrics.json")])
    for name in ("loss.png", "amax_gain.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_amax_gains_of_known_matrices():
    # H = [[1, 1], [0, 1]] for 3 tokens: row sums 2, 1; column sums 1, 2.
    H = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).expand(3, 2, 2)
    g = demo.amax_gains([H, H])
    assert g["single_forward"] == [2.0, 2.0] and g["single_backward"] == [2.0, 2.0]
    # H @ H = [[1, 2], [0, 1]]: row sums 3, 1; column sums 1, 3.
    assert g["forward"] == [2.0, 3.0] and g["backward"] == [2.0, 3.0]


def test_user_data_file_and_deterministic_split(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    train, val = demo.split_data(demo.load_bytes(text))
    assert len(val) == len(text.read_bytes()) // 10 and bytes(val.tolist()) == text.read_bytes()[-len(val):]
    args = ["--data", str(text), "--variants", "residual", "--steps", "3", "--dim", "16", "--layers", "1",
            "--seq-len", "16", "--batch-size", "4", "--quiet", "--out", str(tmp_path / "o")]
    metrics = demo.main(args)
    assert list(metrics["variants"]) == ["residual"] and not metrics["data"]["bundled"]
    again = demo.main(args)  # same seed, same batches, same losses
    assert again["variants"]["residual"]["train_loss"] == metrics["variants"]["residual"]["train_loss"]


def test_bad_arguments():
    with pytest.raises(SystemExit):
        demo.parse_args(["--variants", "residual,bogus"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--dim", "30", "--heads", "4"])


def test_mhc_shifted_variant(tmp_path):
    # DeepSeek-V4.1's shifted collapse, selectable with --variants (not in the default run).
    assert "mhc_shifted" not in demo.parse_args([]).variants and "mhc_shifted" in demo.ALL_VARIANTS
    metrics = demo.main([*TINY, "--variants", "residual,mhc_shifted", "--out", str(tmp_path)])
    r, base = metrics["variants"]["mhc_shifted"], metrics["variants"]["residual"]
    assert r["connection"] == "hcext.nn.HyperConnection(kind='mhc', collapse='shifted')"
    assert r["steps"] == list(range(1, STEPS + 1)) and r["params"] == metrics["variants"]["residual"]["params"] + (
        2 * LAYERS * (4 * 32 * 24 + 3 + 24))  # per sub-layer: phi [n*C, n*n+2n], alpha, bias
    losses = r["train_loss"] + r["val_loss"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(r["train_loss"][-5:]) / 5 < sum(r["train_loss"][:3]) / 3 - 0.5
    assert r["val_loss"][-1] < r["val_loss"][0] - 0.5
    # Initialised to equal the Pre-Norm network (e_0 picks the copied-in embedding, h_pre = 1/n).
    assert r["val_loss"][0] == pytest.approx(base["val_loss"][0], abs=1e-4)
    gains = r["amax_gain"]
    assert len(gains["forward"]) == 2 * LAYERS
    assert gains["forward"] == pytest.approx([1.0] * 2 * LAYERS, abs=1e-3)  # Sinkhorn-projected H_res
