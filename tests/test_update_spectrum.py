"""The update's spectrum per matrix type: how many singular values carry 90% of its nuclear norm."""

import numpy as np
import pytest
import torch
from test_spectral import with_spectrum

from mllm_cl.update_spectrum import directions_for_share, matrix_type, update_spectrum


def test_matrix_type_drops_only_layer_indices() -> None:
    assert matrix_type("llm.blocks.3.attn.qkv.weight") == "llm.blocks.*.attn.qkv.weight"
    assert matrix_type("llm.blocks.12.mlp.fc.weight") == "llm.blocks.*.mlp.fc.weight"
    assert matrix_type("llm.layers.0.attention.query_key_value.weight") == \
        "llm.layers.*.attention.query_key_value.weight"
    assert matrix_type("projector.0.weight") == "projector.0.weight"  # projector layers differ in shape
    assert matrix_type("llm.subblocks.2.weight") == "llm.subblocks.2.weight"


def test_directions_for_share_on_hand_made_spectra() -> None:
    s = torch.tensor([6.0, 2.0, 1.0, 0.5])  # 90% of 9.5 = 8.55: 6, 8 fall short, 9 reaches it
    assert directions_for_share(s) == 3
    assert directions_for_share(s, 0.5) == 1 and directions_for_share(s, 0.99) == 4
    assert directions_for_share(torch.ones(10)) == 9  # a flat spectrum: 9 of 10 carry exactly 90%
    assert directions_for_share(torch.zeros(5)) == 0 and directions_for_share(torch.zeros(0)) == 0


def test_update_of_known_spectrum_gives_hand_computed_k() -> None:
    g = torch.Generator().manual_seed(3)
    updates = {  # singular values chosen, directions random (orthonormal)
        "llm.blocks.0.attn.qkv.weight": with_spectrum((12, 8), torch.tensor([6.0, 2.0, 1.0, 0.5],
                                                                          dtype=torch.float64), g),  # k 3, rank 4
        "llm.blocks.1.attn.qkv.weight": with_spectrum((12, 8), torch.tensor([5.0, 0.1], dtype=torch.float64),
                                                      g),  # 90% of 5.1 = 4.59 <= 5: k 1, rank 2
        "llm.blocks.0.mlp.fc.weight": torch.zeros(16, 8, dtype=torch.float64),  # not updated: k 0
        "projector.0.weight": with_spectrum((8, 6), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), g),  # k 3
        "llm.blocks.0.attn.qkv.bias": torch.ones(12, dtype=torch.float64),  # not a matrix
        "vision.layers.0.fc.weight": torch.ones(8, 8, dtype=torch.float64),  # the frozen tower: left out
    }
    old = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in updates.items()}
    stats = update_spectrum(old, {k: old[k] + updates[k] for k in old}, device="cpu")
    assert stats == {
        "llm.blocks.*.attn.qkv.weight": {"matrices": 2, "shape": [12, 8], "k_mean": 2.0, "k_min": 1, "k_max": 3,
                                         "rank_mean": 3.0},
        "llm.blocks.*.mlp.fc.weight": {"matrices": 1, "shape": [16, 8], "k_mean": 0.0, "k_min": 0, "k_max": 0,
                                       "rank_mean": 0.0},
        "projector.0.weight": {"matrices": 1, "shape": [8, 6], "k_mean": 3.0, "k_min": 3, "k_max": 3,
                               "rank_mean": 3.0}}


def test_update_spectrum_matches_numpy_svd() -> None:
    rng = np.random.default_rng(0)
    ranks = {0: 20, 1: 5, 2: 1, 3: 12}  # full rank (20) and low-rank updates, one per layer
    old, new, expected_k = {}, {}, []
    for layer, rank in ranks.items():
        name = f"llm.blocks.{layer}.mlp.proj.weight"
        scales = np.diag(rng.uniform(0.1, 3.0, rank))
        update = rng.standard_normal((32, rank)) @ scales @ rng.standard_normal((rank, 20))
        old[name] = torch.tensor(rng.standard_normal((32, 20)))
        new[name] = old[name] + torch.tensor(update)
        s = np.linalg.svd(update, compute_uv=False)  # the independent reference
        expected_k.append(int(np.searchsorted(np.cumsum(s), 0.9 * s.sum())) + 1)
    stats = update_spectrum(old, new, device="cpu")["llm.blocks.*.mlp.proj.weight"]
    assert stats["matrices"] == 4 and stats["shape"] == [32, 20]
    assert stats["k_mean"] == pytest.approx(np.mean(expected_k))
    assert (stats["k_min"], stats["k_max"]) == (min(expected_k), max(expected_k))
    assert stats["rank_mean"] == pytest.approx(np.mean(list(ranks.values())))
