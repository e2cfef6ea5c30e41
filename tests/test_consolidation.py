"""ModelMix and Spectral-Aware Consolidation, checked against direct float64 computations.

Every SAC test runs on the plain rule (`consolidation.sac`) and on the fast engine (`spectral.sac`).
"""

from functools import partial

import pytest
import torch

from mllm_cl import consolidation, spectral
from mllm_cl.consolidation import (ConsolidationMismatchError, choose_window, consolidate_spectrum, modelmix,
                                   window_mean, window_sums)

each_sac = pytest.mark.parametrize("sac", [consolidation.sac, partial(spectral.sac, device="cpu")],
                                   ids=["plain", "spectral"])


def pair(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    old = {
        "layer.weight": torch.randn(24, 16, generator=g),
        "layer.bias": torch.randn(24, generator=g),
        "conv.weight": torch.randn(6, 3, 2, 2, generator=g),
        "embed.weight": torch.randn(40, 16, generator=g),
        "other.weight": torch.randn(24, 16, generator=g),
        "norm.weight": torch.ones(16),
    }
    new = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in old.items()}
    return {k: v.to(dtype) for k, v in old.items()}, {k: v.to(dtype) for k, v in new.items()}


def test_modelmix_endpoints_are_exact_and_middle_is_linear():
    old, new = pair(torch.bfloat16)
    assert all(torch.equal(a, old[k]) for k, a in modelmix(old, new, 0.0).items())
    assert all(torch.equal(a, new[k]) for k, a in modelmix(old, new, 1.0).items())
    mixed = modelmix(old, new, 0.25)
    for k in old:
        expected = (old[k].double() + 0.25 * (new[k].double() - old[k].double())).to(torch.bfloat16)
        assert mixed[k].dtype == torch.bfloat16
        torch.testing.assert_close(mixed[k], expected, atol=0, rtol=2**-7)


@each_sac
def test_sac_endpoints_are_exact(sac):
    old, new = pair()
    assert all(torch.equal(a, old[k]) for k, a in sac(old, new, 0.0).items())
    assert all(torch.equal(a, new[k]) for k, a in sac(old, new, 1.0).items())


def test_window_sums_match_direct_window_means():
    s = torch.tensor([9.0, 5.0, 4.0, 1.5, 1.0, 0.25], dtype=torch.float64)
    direct = []
    for k in range(1, len(s) + 1):
        padded = torch.cat([s, s[-1].repeat(k - 1)])
        means = torch.stack([padded[i:i + k].mean() for i in range(len(s))])
        torch.testing.assert_close(window_mean(s, k), means)
        direct.append(means.sum())
    torch.testing.assert_close(window_sums(s), torch.stack(direct))


def test_choose_window_hand_computed():
    # s = [12, 4, 2, 2], sum 20. Window means, padding past the end with the last value 2:
    #   k=1: [12, 4, 2, 2]                              sum 20
    #   k=2: [(12+4)/2, (4+2)/2, (2+2)/2, (2+2)/2]     = [8, 3, 2, 2]           sum 15
    #   k=3: [18/3, 8/3, 6/3, 6/3]                      = [6, 2.667, 2, 2]       sum 12.667
    #   k=4: [20/4, 10/4, 8/4, 8/4]                     = [5, 2.5, 2, 2]         sum 11.5
    # alpha=0.7, target 14: distances 6, 1, 1.333, 2.5   -> k=2
    # alpha=0.6, target 12: distances 8, 3, 0.667, 0.5   -> k=4
    # alpha=1.0, target 20: k=1 (s unchanged); alpha=0.1, target 2: k=4 (the widest window)
    s = torch.tensor([12.0, 4.0, 2.0, 2.0])
    assert choose_window(s, 0.7) == 2
    assert choose_window(s, 0.6) == 4
    assert choose_window(s, 1.0) == 1
    assert choose_window(s, 0.1) == 4
    # alpha=0.7: c = min(1, 14/15) -> s' = 14/15 * [8, 3, 2, 2], whose sum is exactly the alpha share.
    torch.testing.assert_close(consolidate_spectrum(s, 0.7), torch.tensor([8.0, 3.0, 2.0, 2.0]) * 14 / 15)
    # alpha=0.6: the window undershoots (11.5 < 12), so c stays 1 and nothing grows.
    torch.testing.assert_close(consolidate_spectrum(s, 0.6), torch.tensor([5.0, 2.5, 2.0, 2.0]))


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.8, 0.95])
def test_consolidated_spectrum_is_non_increasing_and_below_original(alpha):
    g = torch.Generator().manual_seed(2)
    for s in [torch.rand(50, generator=g).sort(descending=True).values + 1e-3,
              torch.logspace(1, -3, 40), torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0]), torch.tensor([3.0])]:
        out = consolidate_spectrum(s, alpha)
        assert torch.all(out[1:] <= out[:-1] + 1e-6)
        assert torch.all(out <= s + 1e-6)
        assert out.sum() <= alpha * s.sum() + 1e-4  # never more of the update than ModelMix keeps
    s = torch.logspace(1, -3, 40)  # a decaying spectrum: the largest direction shrinks most
    shrink = s - consolidate_spectrum(s, alpha)
    assert shrink[0] == shrink.max() and shrink[0] > 0


@each_sac
def test_flat_spectrum_gets_the_alpha_share(sac):
    s = torch.full((16,), 3.0)
    torch.testing.assert_close(consolidate_spectrum(s, 0.3), torch.full((16,), 0.9))
    # a flat update (3 x an orthogonal matrix) consolidated by SAC equals ModelMix
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    old = {"w": torch.randn(16, 16, dtype=torch.float64)}
    new = {"w": old["w"] + 3 * q}
    torch.testing.assert_close(sac(old, new, 0.3)["w"], modelmix(old, new, 0.3)["w"])


@each_sac
def test_sac_keeps_singular_vectors_and_sets_values(sac):
    old, new = pair(torch.float64)
    alpha = 0.3
    out = sac(old, new, alpha)
    for key in ("layer.weight", "conv.weight", "embed.weight"):
        delta = (new[key] - old[key]).reshape(new[key].shape[0], -1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        projected = u.T @ (out[key] - old[key]).reshape(delta.shape) @ vh.T
        diagonal = torch.diagonal(projected)
        torch.testing.assert_close(projected, torch.diag(diagonal), atol=1e-10, rtol=0)
        # the new singular values are exactly the windowed means, computed here from first principles
        k = choose_window(s, alpha)
        padded = torch.cat([s, s[-1].repeat(k - 1)])
        means = torch.stack([padded[i:i + k].mean() for i in range(len(s))])
        expected = means * min(1.0, float(alpha * s.sum() / means.sum()))
        torch.testing.assert_close(diagonal, expected, atol=1e-10, rtol=1e-10)
    for key in ("layer.bias", "norm.weight"):  # not matrices: ModelMix
        torch.testing.assert_close(out[key], old[key] + alpha * (new[key] - old[key]))


@each_sac
def test_float32_agrees_with_float64(sac):
    old, new = pair(torch.float64)
    exact = sac(old, new, 0.2)
    single = sac({k: v.float() for k, v in old.items()}, {k: v.float() for k, v in new.items()}, 0.2)
    for k in old:
        assert single[k].dtype == torch.float32
        torch.testing.assert_close(single[k].double(), exact[k], atol=2e-5, rtol=1e-5)


@each_sac
def test_mismatches_raise_the_named_error(sac):
    old, new = pair()
    with pytest.raises(ConsolidationMismatchError, match=r"not the new one: \['norm.weight'\]"):
        sac(old, {k: v for k, v in new.items() if k != "norm.weight"}, 0.2)
    with pytest.raises(ConsolidationMismatchError, match=r"not the old one: \['extra'\]"):
        modelmix(old, {**new, "extra": torch.zeros(1)}, 0.2)
    with pytest.raises(ConsolidationMismatchError, match=r"layer.weight: shape \(24, 16\) \(old\) vs \(16, 24\)"):
        sac(old, {**new, "layer.weight": new["layer.weight"].T.contiguous()}, 0.2)
    with pytest.raises(ConsolidationMismatchError, match=r"layer.bias: dtype torch.float32 \(old\) vs torch.float16"):
        modelmix(old, {**new, "layer.bias": new["layer.bias"].half()}, 0.2)
    with pytest.raises(ConsolidationMismatchError, match="layer.bias: the new model holds NaN"):
        sac(old, {**new, "layer.bias": torch.full_like(new["layer.bias"], float("nan"))}, 0.2)
    with pytest.raises(ValueError, match="alpha must lie in"):
        modelmix(old, new, 1.5)


# Hand-computed spectra for both readings of eq 7 (see the module docstring). Steep s = (4, 2, 1, 1) at
# alpha 0.5: the first windowed means m_k(s)_1 are 4, 3, 7/3, 2, so `top` picks k = 4 (2 = 0.5 * 4 exactly,
# c = 1) and m_4(s) = (8/4, 5/4, 4/4, 4/4); the window sums are 8, 6.5, 17/3, 5.25, so `nuclear` picks k = 4
# too, closest to 0.5 * 8 = 4, and scales it by c = 4 / 5.25.
SPECTRA = [
    ("steep", [4.0, 2.0, 1.0, 1.0], 0.5, {"top": [2.0, 1.25, 1.0, 1.0],
                                          "nuclear": [2.0 * 4 / 5.25, 1.25 * 4 / 5.25, 4 / 5.25, 4 / 5.25]}),
    ("flat", [1.0, 1.0, 1.0], 0.3, {"top": [0.3, 0.3, 0.3], "nuclear": [0.3, 0.3, 0.3]}),  # = ModelMix
    ("rank-1", [5.0], 0.2, {"top": [1.0], "nuclear": [1.0]}),
    ("steep, alpha 0", [4.0, 2.0, 1.0, 1.0], 0.0, {"top": [0.0] * 4, "nuclear": [0.0] * 4}),
    ("steep, alpha 1", [4.0, 2.0, 1.0, 1.0], 1.0, {"top": [4.0, 2.0, 1.0, 1.0], "nuclear": [4.0, 2.0, 1.0, 1.0]}),
]


@pytest.mark.parametrize("rule", ["top", "nuclear"])
@pytest.mark.parametrize("name, s, alpha, expected", SPECTRA, ids=[case[0] for case in SPECTRA])
def test_both_window_rules_on_hand_computed_spectra(name, s, alpha, expected, rule) -> None:
    got = consolidate_spectrum(torch.tensor(s, dtype=torch.float64), alpha, rule)
    torch.testing.assert_close(got, torch.tensor(expected[rule], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_top_rule_scales_the_largest_direction_as_modelmix_and_keeps_more_of_the_rest() -> None:
    s = torch.tensor([10.0, 6.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    top, nuclear = consolidate_spectrum(s, 0.3, "top"), consolidate_spectrum(s, 0.3, "nuclear")
    assert float(top[0]) <= 0.3 * 10 + 1e-12 and float(top.sum()) > float(nuclear.sum())
    with pytest.raises(ValueError, match="SAC rule must be one of nuclear, top"):
        consolidate_spectrum(s, 0.3, "middle")
