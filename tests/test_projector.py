"""Projector kinds: shapes, LLaVA's `mm_projector` key numbering, the function computed, bad kinds."""

import pytest
import torch
import torch.nn.functional as F

from mllm_cl.projector import build_projector


def test_linear():
    projector = build_projector("linear", 16, 24)
    assert projector.kind == "linear"
    assert list(projector.state_dict()) == ["0.weight", "0.bias"]
    x = torch.randn(2, 5, 16)
    assert torch.allclose(projector(x), x @ projector[0].weight.T + projector[0].bias)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_mlp_gelu(n):
    projector = build_projector(f"mlp{n}x_gelu", 16, 24)
    expected_keys = [f"{2 * i}.{p}" for i in range(n) for p in ("weight", "bias")]
    assert list(projector.state_dict()) == expected_keys
    shapes = [tuple(projector.state_dict()[f"{2 * i}.weight"].shape) for i in range(n)]
    assert shapes == [(24, 16)] + [(24, 24)] * (n - 1)
    x = torch.randn(2, 5, 16)
    ref = F.linear(x, projector[0].weight, projector[0].bias)  # independent: exact-erf GELU between Linears
    for i in range(1, n):
        ref = F.linear(0.5 * ref * (1 + torch.erf(ref / 2 ** 0.5)), projector[2 * i].weight, projector[2 * i].bias)
    assert torch.allclose(projector(x), ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "mlp0x_gelu", "mlp2x_relu", "Linear", ""])
def test_bad_kind(kind):
    with pytest.raises(ValueError, match="unknown projector kind"):
        build_projector(kind, 16, 24)
