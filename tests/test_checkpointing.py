"""Activation checkpointing: same gradients (dropout included), per-block switching, fewer saved bytes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.checkpointing import disable_checkpointing, enable_checkpointing, is_checkpointed


class Block(nn.Module):
    """Called like an LLM block: several positional tensors, one of them optional."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor, gain: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None):
        h = self.fc2(self.drop(F.gelu(self.fc1(x * gain)))) * mask
        return x + (h if bias is None else h + bias)


class Stack(nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x, gain, mask, bias):
        for block in self.blocks:
            x = block(x, gain, mask, bias)
        return x


def _grads(model: Stack, x_requires_grad: bool = True, bias: torch.Tensor | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 16, generator=g).requires_grad_(x_requires_grad)
    gain = torch.rand(16, generator=g).requires_grad_()
    mask = (torch.rand(4, 8, 1, generator=g) > 0.3).float()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, gain, mask, bias)
    out.pow(2).sum().backward()
    after = torch.rand(3)  # the global RNG stream continues as if no block had been re-run
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["x"] = x.grad.clone() if x_requires_grad else None
    grads["gain"] = gain.grad.clone()
    return out.detach(), grads, after


def _assert_same(a, b) -> None:
    out_a, grads_a, after_a = a
    out_b, grads_b, after_b = b
    assert torch.equal(out_a, out_b) and torch.equal(after_a, after_b)
    for name in grads_a:
        if grads_a[name] is None:
            assert grads_b[name] is None
        else:
            assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7), name


def test_same_gradients_with_dropout_and_several_inputs() -> None:
    model = Stack().train()
    plain = _grads(model)
    bias = torch.randn(16)
    plain_bias = _grads(model, bias=bias)
    keys = list(model.state_dict())
    enable_checkpointing(model.blocks)
    assert all(is_checkpointed(b) for b in model.blocks) and list(model.state_dict()) == keys
    _assert_same(plain, _grads(model))
    _assert_same(plain_bias, _grads(model, bias=bias))
    assert not torch.allclose(_grads(model, seed=2)[0], plain[0])  # dropout really is active


def test_params_get_grads_when_no_input_requires_grad() -> None:
    model = Stack().train()
    plain = _grads(model, x_requires_grad=False)
    enable_checkpointing(model.blocks)
    _assert_same(plain, _grads(model, x_requires_grad=False))


def test_per_block_switching_and_disable() -> None:
    model = Stack().train()
    plain = _grads(model)
    enable_checkpointing(model.blocks, [True, False, True])
    assert [is_checkpointed(b) for b in model.blocks] == [True, False, True]
    _assert_same(plain, _grads(model))
    disable_checkpointing(model.blocks)
    assert not any(is_checkpointed(b) for b in model.blocks)
    _assert_same(plain, _grads(model))
    with pytest.raises(ValueError, match="entries for 3 blocks"):
        enable_checkpointing(model.blocks, [True])


def test_deepcopy_binds_the_copy_and_no_grad_runs_plainly() -> None:
    model = Stack().eval()
    enable_checkpointing(model.blocks)
    twin = copy.deepcopy(model)
    assert is_checkpointed(twin.blocks[0]) and twin.blocks[0].forward.__self__ is twin.blocks[0]
    with torch.no_grad():
        twin.blocks[0].fc1.weight.zero_()
        twin.blocks[0].fc1.bias.zero_()
    x, gain, mask = torch.randn(2, 3, 16), torch.ones(16), torch.ones(2, 3, 1)
    with torch.no_grad():
        assert torch.equal(twin.blocks[0](x, gain, mask, None), x + twin.blocks[0].fc2.bias)  # uses its own weights
        assert not torch.equal(model.blocks[0](x, gain, mask, None), x + model.blocks[0].fc2.bias)


def _saved_bytes(model: Stack) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.randn(4, 32, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, torch.ones(16), torch.ones(4, 32, 1), None)
    out.sum().backward()
    return total


def test_checkpointing_saves_fewer_bytes() -> None:
    model = Stack().train()
    plain = _saved_bytes(model)
    enable_checkpointing(model.blocks)
    checkpointed = _saved_bytes(model)
    # per block only x, gain and mask remain: 4*32*16 + 16 + 4*32 floats
    assert checkpointed == 3 * (4 * 32 * 16 + 16 + 4 * 32) * 4
    assert checkpointed * 5 < plain
