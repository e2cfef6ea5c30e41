import torch
import torch.nn as nn

from mllm_cl.methods.lora_layers import LoRALinear, add_lora, lora_parameters, merge_lora


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def test_fresh_adapter_leaves_outputs_unchanged() -> None:
    net, x = _net(), torch.randn(3, 8)
    before = net(x)
    add_lora(net, rank=4, alpha=8.0, dropout=0.0)
    assert torch.equal(net(x), before)


def test_merged_equals_unmerged_and_layout_is_plain() -> None:
    net, x = _net(), torch.randn(3, 8)
    keys = set(net.state_dict())
    add_lora(net, rank=4, alpha=8.0, dropout=0.0)
    for p in lora_parameters(net):
        nn.init.normal_(p)
    adapted = net(x)
    assert merge_lora(net) == 2
    assert torch.allclose(net(x), adapted, atol=1e-5)
    assert set(net.state_dict()) == keys
    assert not any(isinstance(m, LoRALinear) for m in net.modules())


def test_rslora_scale_and_only_adapters_get_gradients() -> None:
    net = _net()
    add_lora(net, rank=4, alpha=8.0)
    layer = net[0]
    assert layer.scale == 8.0 / 2.0  # alpha / sqrt(rank)
    net(torch.randn(2, 8)).sum().backward()
    for name, p in net.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_exclude_keeps_output_head_plain() -> None:
    net = nn.ModuleDict({"body": nn.Linear(4, 4), "lm_head": nn.Linear(4, 4)})
    assert add_lora(net, rank=2, alpha=8.0) == ["body"]
