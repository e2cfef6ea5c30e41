"""The linear-probe diagnostic: it finds what the images encode, not what they do not, and its ridge is exact."""

import json
import sys
from pathlib import Path

import pytest
import torch

from mllm_cl.probe import (ATTRIBUTES, draw, fit_and_score, logistic_fit, probe_towers, ridge_fit, ridge_predict,
                            tower_features)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import vision_probe  # noqa: E402


def test_the_probe_separates_an_encoded_attribute_from_a_shuffled_control() -> None:
    # Raw pixels encode a shape's colour (in their average) and the cell it is in (in their layout); the control's
    # labels are shuffled across images, so neither read-out may find it.
    columns = probe_towers({"pixels": None}, ("colour", "position", "control"), pools=("flat", "mean"), n_train=150,
                           n_val=50, n_test=150, image_size=32)
    (_, position, flat_control), (colour, _, mean_control) = columns["pixels (flat)"], columns["pixels (mean)"]
    assert colour.accuracy >= colour.chance + 30 and position.accuracy >= position.chance + 50
    for control in (flat_control, mean_control):
        assert control.interval[0] <= control.chance + 5 and control.accuracy <= control.chance + 12
    assert colour.interval[0] <= colour.accuracy <= colour.interval[1] and colour.n_test == 150


def test_the_mean_read_out_loses_where_a_shape_is() -> None:
    # Averaged over pixels, an image still says which colour it holds, but no longer where the shape is.
    columns = probe_towers({"pixels": None}, ("colour", "position"), pools=("flat", "mean"), n_train=150, n_val=50,
                           n_test=150, image_size=32)
    flat, mean = columns["pixels (flat)"], columns["pixels (mean)"]
    assert mean[0].accuracy >= mean[0].chance + 30
    assert flat[1].accuracy >= 90 and mean[1].accuracy <= mean[1].chance + 15


def test_ridge_fit_matches_the_primal_normal_equations() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=generator)
    ridge = 0.5
    weights = ridge_fit(x, y, 3, ridge)
    # Independent computation: centre, solve (X^T X + lam I) W = X^T T in the primal, bias from the means.
    targets = torch.nn.functional.one_hot(y, 3).double()
    xc, tc = x - x.mean(0), targets - targets.mean(0)
    lam = ridge * (xc * xc).sum(1).mean()
    primal = torch.linalg.solve(xc.T @ xc + lam * torch.eye(7, dtype=torch.float64), xc.T @ tc)
    bias = targets.mean(0) - x.mean(0) @ primal
    torch.testing.assert_close(weights[:-1], primal)
    torch.testing.assert_close(weights[-1], bias)
    assert torch.equal(ridge_predict(weights, x), (x @ primal + bias).argmax(1))


def test_scenes_are_balanced_and_deterministic() -> None:
    pixels, labels = draw("count", 20, seed=3, image_size=32)
    again, same = draw("count", 20, seed=3, image_size=32)
    assert torch.equal(pixels, again) and torch.equal(labels, same)
    assert pixels.shape == (20, 3, 32, 32) and torch.bincount(labels).tolist() == [4] * 5
    with pytest.raises(ValueError, match="unknown attribute"):
        draw("smell", 4, 0, 32)
    with pytest.raises(ValueError, match="pool must be"):
        tower_features(None, pixels, pool="max")


def test_every_attribute_draws_its_classes() -> None:
    for name, (classes, _) in ATTRIBUTES.items():
        _, labels = draw(name, 2 * len(classes), seed=0, image_size=16)
        assert sorted(set(labels.tolist())) == list(range(len(classes))), name


def test_the_bench_script_prints_and_writes_the_table(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["vision_probe.py", "--attributes", "colour", "control", "--train", "30",
                                      "--val", "12", "--test", "30", "--json", str(out)])
    vision_probe.main()
    printed = capsys.readouterr().out
    assert "| colour | 16.7 |" in printed and "untrained (mean)" in printed and "pixels (flat)" in printed
    figures = json.loads(out.read_text())
    assert set(figures) == {"pixels (flat)", "pixels (mean)", "untrained (flat)", "untrained (mean)"}
    assert [r["attribute"] for r in figures["untrained (flat)"]] == ["colour", "control"]


def test_logistic_fit_is_a_stationary_point_of_its_objective() -> None:
    # The gradient of mean cross-entropy + penalty |W_z|^2, written out by hand, vanishes at the fitted weights.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=generator, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 3, (60,), generator=generator)
    penalty = 0.05
    weights = logistic_fit(x, y, 3, penalty)
    mean, std = x.mean(0), x.std(0)
    w_z = weights[:-1] * std[:, None]  # back onto the standardised features the objective is defined on
    z = (x - mean) / std
    probs = torch.softmax(z @ w_z + (weights[-1] + mean @ weights[:-1]), dim=1)
    residual = (probs - torch.nn.functional.one_hot(y, 3).double()) / len(x)
    assert torch.allclose(z.T @ residual + 2 * penalty * w_z, torch.zeros_like(w_z), atol=1e-6)
    assert torch.allclose(residual.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-6)


def test_logistic_probe_reads_an_ordered_attribute_that_least_squares_misses() -> None:
    # Five classes lying in order along one direction (as a count would): argmax of affine scores can carve them,
    # the cross-entropy fit finds it, and least squares to one-hot targets leaves the middle classes behind.
    generator = torch.Generator().manual_seed(2)
    y = torch.arange(500) % 5
    x = torch.cat([y[:, None].double() + 0.15 * torch.randn(500, 1, generator=generator, dtype=torch.float64),
                   torch.randn(500, 3, generator=generator, dtype=torch.float64)], dim=1)
    logistic, _ = fit_and_score(x, y, 5, n_train=300, n_val=100, probe="logistic")
    ridge, _ = fit_and_score(x, y, 5, n_train=300, n_val=100, probe="ridge")
    assert logistic >= 95 and ridge <= 80
    with pytest.raises(ValueError, match="unknown probe"):
        fit_and_score(x, y, 5, n_train=300, n_val=100, probe="svm")
