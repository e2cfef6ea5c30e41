"""Training throughput: our decoder against Hugging Face's `GPTNeoXForCausalLM`, in one process, same shapes.

Both get random weights, the same batch, bf16 compute and fused AdamW. Ours uses the hand-written mixed
precision (bf16 params, fp32 masters), activation checkpointing, the chunked head + cross-entropy
(`losses.head_cross_entropy`) and, with `--compile inductor` (the GPU default), `torch.compile`d blocks;
Hugging Face uses `torch.autocast` over fp32 params and its own gradient checkpointing, as in DESIGN.md
section 7. Prints tokens/s, MFU, peak memory
and the ratio ours / HF; never asserts. Also times a full LLaVA step (frozen CLIP ViT-L/14-336 + mlp2x_gelu +
Pythia-410M, 576 image + 512 text tokens).

    python bench/train_speed.py                      # on a GPU: Pythia-160M/410M/1.4B and the LLaVA step
    python bench/train_speed.py --models tiny        # anywhere (the CPU default)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.checkpointing import enable_checkpointing  # noqa: E402
from mllm_cl.config import IMAGE_PLACEHOLDER_ID, llm_preset, vision_preset  # noqa: E402
from mllm_cl.llava import LlavaModel  # noqa: E402
from mllm_cl.llm import LanguageModel, compile_blocks  # noqa: E402
from mllm_cl.optim import build_optimizer  # noqa: E402
from mllm_cl.precision import MixedPrecision  # noqa: E402
from mllm_cl.projector import build_projector  # noqa: E402
from mllm_cl.stages import forward_loss, language_model  # noqa: E402
from mllm_cl.vision import VisionTower  # noqa: E402

H100_BF16_PEAK = 989e12


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def reset_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # each configuration compiles afresh instead of filling dynamo's recompile limit
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def ours_step_fn(model: torch.nn.Module, dtype: torch.dtype, batch: dict, compile_backend: str):
    precision = MixedPrecision(model, dtype)
    optimizer = build_optimizer(precision.named_master_params(), {"": 1e-4}, weight_decay=0.1)
    if compile_backend:
        compile_blocks(language_model(model), compile_backend)

    def step() -> None:
        precision.backward(forward_loss(model, batch)[1])
        precision.step(optimizer, 1.0)

    return step


def hf_step_fn(model: torch.nn.Module, batch: dict):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_gpt_neox(name: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    c = llm_preset(name)
    config = GPTNeoXConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer,
                           num_attention_heads=c.n_head, intermediate_size=c.d_ff, rotary_pct=c.rotary_pct,
                           max_position_embeddings=c.max_seq_len, use_parallel_residual=True,
                           attn_implementation="sdpa")
    return GPTNeoXForCausalLM(config)


def bench_llm(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    config = llm_preset(name)
    tokens = args.batch * args.seq
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    for checkpointing in (False, True):
        reset_memory(device)
        torch.manual_seed(0)
        model = LanguageModel(config).to(device)
        params = n_params(model)
        if checkpointing:
            enable_checkpointing(model.blocks)
        seconds = timed(ours_step_fn(model, dtype, batch, args.compile), args.steps, args.warmup, device)
        ours_tps, ours_mem = tokens / seconds, peak_gib(device)
        del model
        line = (f"{name:12s} ckpt={'on ' if checkpointing else 'off'} ours {ours_tps:10,.0f} tok/s "
                f"MFU {6 * params * ours_tps / H100_BF16_PEAK:6.1%} peak {ours_mem:5.1f} GiB")
        if device.type == "cuda" and not args.no_hf:
            reset_memory(device)
            hf = hf_gpt_neox(name).to(device)
            if checkpointing:
                hf.gradient_checkpointing_enable()
            hf.train()
            seconds = timed(hf_step_fn(hf, batch), args.steps, args.warmup, device)
            hf_tps, hf_mem = tokens / seconds, peak_gib(device)
            del hf
            line += (f" | HF {hf_tps:10,.0f} tok/s MFU {6 * params * hf_tps / H100_BF16_PEAK:6.1%} "
                     f"peak {hf_mem:5.1f} GiB | ours/HF {ours_tps / hf_tps:4.2f}x")
        print(line, flush=True)


def bench_llava(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    vision_config = vision_preset("clip-vit-l-14-336")
    llm_config = llm_preset("pythia-410m")
    n_image, n_text = vision_config.num_image_tokens, 512
    for checkpointing in (False, True):
        reset_memory(device)
        torch.manual_seed(0)
        vision = VisionTower(vision_config)
        llm = LanguageModel(llm_config)
        model = LlavaModel(vision, build_projector("mlp2x_gelu", vision_config.d_model, llm_config.d_model), llm)
        model.to(device)
        if checkpointing:
            enable_checkpointing(llm.blocks)
        text = torch.randint(0, llm_config.vocab_size, (args.batch, n_text), device=device)
        image = torch.full((args.batch, n_image), IMAGE_PLACEHOLDER_ID, device=device)
        ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
        labels = torch.cat([torch.full_like(image[:, :1].expand(-1, n_image + 1), -100), text[:, 1:]], dim=1)
        pixels = torch.randn(args.batch, 3, vision_config.image_size, vision_config.image_size, device=device)
        batch = {"input_ids": ids, "labels": labels, "pixel_values": pixels.to(dtype)}
        seconds = timed(ours_step_fn(model, dtype, batch, args.compile), args.steps, args.warmup, device)
        print(f"llava-410m   ckpt={'on ' if checkpointing else 'off'} ours {args.batch / seconds:8.1f} samples/s "
              f"({args.batch * ids.size(1) / seconds:10,.0f} tok/s) peak {peak_gib(device):5.1f} GiB "
              f"| HF reference (DESIGN.md 7, H100): {'56.4 samples/s, 17.7' if checkpointing else '84.4 samples/s, 31.1'}"
              " GiB", flush=True)
        del model, vision, llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", default="pythia-160m,pythia-410m,pythia-1.4b" if cuda else "tiny")
    parser.add_argument("--batch", type=int, default=16 if cuda else 4)
    parser.add_argument("--seq", type=int, default=1024 if cuda else 128)
    parser.add_argument("--steps", type=int, default=10 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--no-hf", action="store_true", help="time ours only")
    parser.add_argument("--compile", default="inductor" if cuda else "",
                        help="torch.compile backend for our blocks ('' for eager); its compile time is warm-up")
    parser.add_argument("--llava", action=argparse.BooleanOptionalAction, default=cuda)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"batch {args.batch} x {args.seq} tokens, {str(dtype).removeprefix('torch.')}, "
          f"ours compiled: {args.compile or 'no'}", flush=True)
    runs = [(bench_llm, (name, args, device, dtype)) for name in args.models.split(",")]
    runs += [(bench_llava, (args, device, dtype))] if args.llava else []
    for run, run_args in runs:
        try:
            run(*run_args)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # report it and go on with the other shapes
            print(f"{run.__name__}{run_args[:1]}: failed: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)


if __name__ == "__main__":
    main()
