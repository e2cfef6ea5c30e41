"""compile_blocks: the compiled blocks compute what the eager ones do, compile once for all blocks, and leave
generation (KV cache) eager. The CPU tests use the aot_eager backend: it traces and partitions the graphs
like inductor does, without a C++ toolchain."""

import torch
from torch._dynamo.utils import counters

from mllm_cl.checkpointing import enable_checkpointing
from mllm_cl.config import TrainConfig, llm_preset
from mllm_cl.llm import LanguageModel, compile_blocks, uncompile_blocks
from mllm_cl.losses import causal_lm_loss
from mllm_cl.trainer import Trainer


def _loss_and_grads(model: LanguageModel, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = causal_lm_loss(model(ids).logits, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_match_eager_with_and_without_checkpointing() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = LanguageModel(llm_preset("tiny", n_layer=3))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    eager_loss, eager_grads = _loss_and_grads(model, ids)
    counters.clear()
    compile_blocks(model, backend="aot_eager")
    for checkpointed in (False, True):
        if checkpointed:
            enable_checkpointing(model.blocks)
        loss, grads = _loss_and_grads(model, ids)
        torch.testing.assert_close(loss, eager_loss)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], msg=lambda m, n=name: f"{n}: {m}")
    # one graph per grad mode (the checkpointed first run is under no_grad), not one per block
    assert counters["stats"]["unique_graphs"] <= 2
    uncompile_blocks(model)
    assert all(block.compiled is None for block in model.blocks)


def test_a_kv_cache_forward_stays_eager() -> None:
    torch.manual_seed(0)
    model = LanguageModel(llm_preset("tiny", n_layer=2)).eval()
    calls = []
    compile_blocks(model, backend="aot_eager")
    for block in model.blocks:
        block.compiled = lambda *args, fn=block.compiled: calls.append(1) or fn(*args)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        model(ids, kv_cache=model.new_kv_cache(1, 8))
        assert calls == []
        model(ids)
    assert len(calls) == 2


def test_trainer_compile_option_trains_the_same_weights(tmp_path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (8, 16))
    batches = [{"input_ids": ids[i:i + 4]} for i in range(0, 8, 4)]

    def loss_fn(model: LanguageModel, batch: dict) -> tuple[torch.Tensor, int]:
        return causal_lm_loss(model(batch["input_ids"]).logits, batch["input_ids"]), batch["input_ids"].numel()

    models = []
    for backend in ("", "aot_eager"):
        torch.manual_seed(1)
        model = LanguageModel(llm_preset("tiny", n_layer=2))
        config = TrainConfig(steps=2, global_batch_size=4, micro_batch_size=4, lrs={"": 1e-3}, precision="fp32",
                             device="cpu", compile=backend, activation_checkpointing=True)
        Trainer(model, loss_fn, lambda epoch: batches, config, out_dir=tmp_path / (backend or "eager")).fit()
        assert all(block.compiled is None for block in model.blocks)  # eager again after fit()
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")
