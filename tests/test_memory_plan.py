"""The memory plan's arithmetic against hand computation, and its parameter counts against the published ones."""

import pytest

from mllm_cl.memory_plan import ModelShape, model_shape, per_gpu_bytes, plan_table

SMALL = ModelShape(name="small", llm_params=1000, frozen_params=100, projector_params=10, adapter_params=50,
                   lora_rank=2, n_layer=2, d_model=4, d_ff=16, mlp="gelu")


def test_per_gpu_bytes_by_hand() -> None:
    # 3 tokens x 2 sequences: a layer keeps 14*6*4 + 2*6*4 + 4*6*16 = 336 + 48 + 384 = 768 bytes
    ddp = per_gpu_bytes(SMALL, "full", "ddp", 4, tokens=3, batch=2, checkpointing=False)
    assert ddp == {"weights and optimizer": 1010 * 20 + 100 * 2, "ddp buckets": 1010 * 2, "activations": 2 * 768,
                   "total": 20400 + 2020 + 1536}
    lora = per_gpu_bytes(SMALL, "lora", "ddp", 1, tokens=3, batch=2, checkpointing=True)
    assert lora["weights and optimizer"] == 60 * 20 + 1100 * 2  # adapters + projector train, the LLM is frozen
    assert lora["activations"] == 2 * (2 * 6 * 4) + 768  # each layer's input, and one block recomputed
    fsdp = per_gpu_bytes(SMALL, "full", "fsdp", 4, tokens=3, batch=2, checkpointing=False)
    block = 4 * 4 * 4 + 2 * 4 * 16  # q, k, v, o and the two MLP matrices
    # fp32 shards (masters), their grads and AdamW state split 4 ways; the frozen params whole on every rank
    assert fsdp["weights and optimizer"] == 1010 * 16 // 4 + 100 * 2
    assert fsdp["fsdp blocks in flight"] == 2 * block * 4
    swiglu = per_gpu_bytes(ModelShape(**{**SMALL.__dict__, "mlp": "swiglu"}), "full", "ddp", 1, 3, 2, False)
    assert swiglu["activations"] == 2 * (336 + 48 + 8 * 6 * 16)
    with pytest.raises(ValueError, match="engine ddp or fsdp"):
        per_gpu_bytes(SMALL, "full", "zero3", 2, 3, 2, False)


def test_parameter_counts_are_the_published_ones() -> None:
    assert model_shape("pythia-1.4b").llm_params == 1_414_647_808  # EleutherAI/pythia-1.4b
    llava = model_shape("vicuna-7b", "clip-vit-l-14-336", lora_rank=128)
    assert llava.llm_params == 6_738_415_616  # LLaMA-7B / Vicuna-7B
    assert llava.projector_params == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu
    # our LLaMA layers fuse q, k, v into one linear and gate, up into another: an adapter on each of 4 linears
    fused = (4096 + 3 * 4096) + (4096 + 4096) + (4096 + 2 * 11008) + (11008 + 4096)
    assert llava.adapter_params == 128 * 32 * fused


def test_the_plan_marks_what_does_not_fit() -> None:
    table = plan_table(gpus=(1, 8))
    row = next(line for line in table.splitlines() if line.startswith("| vicuna-7b") and "| full | off | ddp |" in line)
    assert row.count("(no)") == 2  # 7B full fine-tuning with AdamW does not fit one 80 GB GPU's DDP replica
    assert len(table.splitlines()) == 2 + 3 * 2 * 2 * 2
