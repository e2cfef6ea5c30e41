"""The fast SAC engine (batched Gram and sketched SVDs) gives the plain per-matrix rule's numbers."""

import re

import pytest
import torch
from test_consolidation import pair

from mllm_cl import consolidation, spectral
from mllm_cl.spectral import decompose_updates, sac, sac_from_spectra

ALPHAS = (0.0, 0.05, 0.2, 0.5, 0.9, 1.0)


def with_spectrum(shape: tuple[int, ...], s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random tensor whose (out, rest) matrix has singular values s."""
    rows, cols = shape[0], torch.Size(shape[1:]).numel()
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).reshape(shape)


def updated(updates: dict[str, torch.Tensor], g: torch.Generator) -> tuple[dict, dict]:
    old = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in updates.items()}
    return old, {k: old[k] + updates[k] for k in old}


def full_rank_pair() -> tuple[dict, dict]:
    """Matrices of several shapes, two of them alike (one batched call), with steep, flat and random spectra."""
    g = torch.Generator().manual_seed(6)
    return updated({
        "steep": with_spectrum((48, 32), torch.logspace(0, -4, 32, dtype=torch.float64), g),
        "random": torch.randn(48, 32, generator=g, dtype=torch.float64),
        "flat_wide": with_spectrum((32, 48), torch.full((32,), 0.5, dtype=torch.float64), g),
        "conv": torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64),
        "bias": torch.randn(48, generator=g, dtype=torch.float64),
    }, g)


def low_rank_pair() -> tuple[dict, dict]:
    """Updates of rank 4 and below (merged LoRAs), steep and flat, and a bias."""
    g = torch.Generator().manual_seed(7)
    return updated({
        "steep": with_spectrum((96, 64), torch.tensor([4.0, 1.0, 0.3, 0.05], dtype=torch.float64), g),
        "flat": with_spectrum((96, 64), torch.full((4,), 0.7, dtype=torch.float64), g),
        "wide": with_spectrum((40, 72), torch.tensor([2.0, 0.5], dtype=torch.float64), g),
        "bias": torch.randn(96, generator=g, dtype=torch.float64),
    }, g)


def assert_same(fast: dict, plain: dict) -> None:
    assert fast.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(fast[key], plain[key], atol=1e-10, rtol=1e-10, msg=key)


@pytest.mark.parametrize("rule", consolidation.RULES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_fast_sac_equals_the_plain_rule(alpha, rule):
    old, new = full_rank_pair()
    assert_same(sac(old, new, alpha, rule, device="cpu"), consolidation.sac(old, new, alpha, rule))


@pytest.mark.parametrize("rank", [4, 7])  # the updates' exact rank, and a looser hint
def test_sketched_sac_equals_the_plain_rule(rank):
    old, new = low_rank_pair()
    messages = []
    spectra = decompose_updates(old, new, rank=rank, device="cpu", log=messages.append)
    sketched = [int(re.search(r"(\d+) by the low-rank sketch", m).group(1)) for m in messages]
    assert sketched == [2, 1]  # every update: the two (96, 64) and the (40, 72)
    for alpha in ALPHAS:
        assert_same(sac_from_spectra(old, new, spectra, alpha), consolidation.sac(old, new, alpha))
        assert_same(sac(old, new, alpha, rank=rank, device="cpu"), consolidation.sac(old, new, alpha))


def test_endpoints_skip_the_svds(monkeypatch):
    def no_svds(*args):
        raise AssertionError("SVDs computed for alpha 0 or 1")

    monkeypatch.setattr(spectral, "_decompose", no_svds)
    old, new = full_rank_pair()
    assert all(torch.equal(v, old[k]) for k, v in sac(old, new, 0.0).items())
    assert all(torch.equal(v, new[k]) for k, v in sac(old, new, 1.0).items())
    with pytest.raises(ValueError, match="alpha must lie in"):
        sac(old, new, 1.5)


def test_low_rank_path_equals_full_path():
    g = torch.Generator().manual_seed(3)
    old = {"a": torch.randn(96, 64, generator=g, dtype=torch.float64),
           "b": torch.randn(96, 64, generator=g, dtype=torch.float64),
           "full": torch.randn(64, 64, generator=g, dtype=torch.float64)}
    new = {"a": old["a"] + torch.randn(96, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 64, generator=g,
                                                                                              dtype=torch.float64),
           "b": old["b"] + torch.randn(96, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 64, generator=g,
                                                                                              dtype=torch.float64),
           "full": old["full"] + torch.randn(64, 64, generator=g, dtype=torch.float64)}
    messages = []
    low = decompose_updates(old, new, rank=5, device="cpu", log=messages.append)
    full = decompose_updates(old, new, device="cpu")
    assert [len(low[k].s) for k in ("a", "b", "full")] == [5, 3, 64]
    assert any("2 by the low-rank sketch" in m for m in messages)  # "full" fell back to the full SVD
    for k in old:
        torch.testing.assert_close(low[k].s, full[k].s, atol=1e-10, rtol=1e-10)
    for alpha in (0.1, 0.5):
        a, b = sac_from_spectra(old, new, low, alpha), sac_from_spectra(old, new, full, alpha)
        for k in old:
            torch.testing.assert_close(a[k], b[k], atol=1e-10, rtol=1e-10)


def test_batched_by_shape_equals_one_by_one():
    old, new = pair()
    together = sac(old, new, 0.4, device="cpu")
    for key in ("layer.weight", "other.weight"):  # same shape: decomposed in one batched call
        alone = sac({key: old[key]}, {key: new[key]}, 0.4, device="cpu")[key]
        torch.testing.assert_close(together[key], alone, atol=1e-5, rtol=1e-5)
