"""Training throughput: ours against Hugging Face's `GPTNeoXForCausalLM` and `LlavaForConditionalGeneration`,
in one process, same shapes, same batch.

Both get random weights, bf16 compute and fused AdamW. Ours uses the hand-written mixed precision (bf16
params, fp32 masters), activation checkpointing, the chunked head + cross-entropy
(`losses.head_cross_entropy`) and, with `--compile inductor` (the GPU default), `torch.compile`d blocks;
Hugging Face uses `torch.autocast` over fp32 params and its own gradient checkpointing, as in DESIGN.md
section 7. Prints tokens/s, MFU, peak memory and the ratio ours / HF; never asserts. The LLaVA step is a
frozen CLIP ViT-L/14-336 + mlp2x_gelu + Pythia-410M, 576 image + 512 text tokens. `--profile` adds where each
step's time goes (`kernel_profile.py`). On the CPU everything runs at tiny shapes in fp32.

    python bench/train_speed.py                      # on a GPU: Pythia-160M/410M/1.4B and the LLaVA step
    python bench/train_speed.py --models tiny        # anywhere (the CPU default)
    python bench/train_speed.py --models pythia-160m --ckpt off --no-llava --profile   # where the time goes

`--nproc N` measures the trainer itself (`mllm_cl.trainer`, the engine of `--engine`: ddp or fsdp) on 1 and N
processes: the script launches itself under torchrun, each process trains the first of `--models` on `--batch`
sequences per step (the global batch grows with N), and prints tokens/s in all and per GPU, the scaling
efficiency (tokens/s per GPU on N against one process with the same engine) and, at world size 1, the
engine's overhead against plain training.

    python bench/train_speed.py --nproc 8 --engine fsdp --models pythia-1.4b --ckpt on
    python bench/train_speed.py --nproc 2 --models tiny            # the CPU (gloo): the mechanics, not a speed
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mllm_cl import distributed  # noqa: E402
from mllm_cl.checkpointing import enable_checkpointing  # noqa: E402
from mllm_cl.config import IMAGE_PLACEHOLDER_ID, TrainConfig, llm_preset, vision_preset  # noqa: E402
from mllm_cl.device import resolve_device  # noqa: E402
from mllm_cl.llava import LlavaModel  # noqa: E402
from mllm_cl.llm import LanguageModel, compile_blocks  # noqa: E402
from mllm_cl.optim import build_optimizer  # noqa: E402
from mllm_cl.precision import MixedPrecision  # noqa: E402
from mllm_cl.projector import build_projector  # noqa: E402
from mllm_cl.losses import forward_loss, language_model  # noqa: E402
from mllm_cl.trainer import Trainer  # noqa: E402
from mllm_cl.vision import VisionTower  # noqa: E402
from mllm_cl.weights import llm_config_to_hf, vision_config_to_hf  # noqa: E402

from kernel_profile import print_kernel_profile  # noqa: E402

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


def checkpoint_settings(args: argparse.Namespace) -> list[bool]:
    settings = {"off": False, "on": True}
    names = [n.strip() for n in args.ckpt.split(",")]
    if not names or any(n not in settings for n in names):
        raise SystemExit(f"--ckpt takes 'off', 'on' or 'off,on', got {args.ckpt!r}")
    return [settings[n] for n in names]


def ours_step_fn(model: torch.nn.Module, dtype: torch.dtype, batch: dict, compile_backend: str):
    precision = MixedPrecision(model, dtype)
    optimizer = build_optimizer(precision.named_master_params(), {"": 1e-4}, weight_decay=0.1)
    if compile_backend:
        compile_blocks(language_model(model), compile_backend)

    def step() -> None:
        precision.backward(forward_loss(model, batch).loss)
        precision.step(optimizer, 1.0)

    return step


def hf_step_fn(model: torch.nn.Module, inputs: dict, dtype: torch.dtype):
    """HF's step as DESIGN.md section 7 measured it: fp32 params under autocast, fused AdamW, clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    device_type = params[0].device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_enable_checkpointing(model: torch.nn.Module) -> None:
    # renamed in transformers 5.2x; the old name still works there, with a deprecation warning
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def hf_text_config(name: str):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**llm_config_to_hf(llm_preset(name)), attn_implementation="sdpa")


def hf_gpt_neox(name: str):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(hf_text_config(name))


def hf_llava(vision_name: str, llm_name: str, image_token_id: int, dtype: torch.dtype):
    """transformers' LlavaForConditionalGeneration with our shapes: CLIP tower (frozen, in the compute dtype as
    LLaVA trains it), mlp2x_gelu projector, GPT-NeoX LLM, features of the second-to-last layer without the class token."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    v = vision_preset(vision_name)
    vision_config = CLIPVisionConfig(**{k: x for k, x in vision_config_to_hf(v).items() if k != "mllm_cl"})
    config = LlavaConfig(vision_config=vision_config, text_config=hf_text_config(llm_name),
                         image_token_index=image_token_id, image_seq_length=v.num_image_tokens,
                         projector_hidden_act="gelu", vision_feature_layer=v.select_layer,
                         vision_feature_select_strategy="default" if v.select_feature == "patch" else "full")
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False).to(dtype)
    return model


def measure(make_step, args: argparse.Namespace, device: torch.device, label: str) -> tuple[float, float]:
    """(seconds per step, peak GiB) of the step `make_step()` builds; the model goes when its step does."""
    reset_memory(device)
    torch.manual_seed(0)
    step = make_step()
    seconds = timed(step, args.steps, args.warmup, device)
    peak = peak_gib(device)
    if args.profile:
        print_kernel_profile(step, device, label=label)
    return seconds, peak


def bench_llm(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    config = llm_preset(name)
    tokens = args.batch * args.seq
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    with torch.device("meta"):  # counted without allocating
        params = n_params(LanguageModel(config))
    for checkpointing in checkpoint_settings(args):
        def ours():
            model = LanguageModel(config).to(device)
            if checkpointing:
                enable_checkpointing(model.blocks)
            return ours_step_fn(model, dtype, batch, args.compile)

        def hf():
            model = hf_gpt_neox(name).to(device).train()
            if checkpointing:
                hf_enable_checkpointing(model)
            return hf_step_fn(model, batch, dtype)

        label = f"{name} ckpt={'on ' if checkpointing else 'off'}"
        seconds, ours_mem = measure(ours, args, device, f"ours {label}")
        ours_tps = tokens / seconds
        line = (f"{label:20s} ours {ours_tps:10,.0f} tok/s MFU {6 * params * ours_tps / H100_BF16_PEAK:6.1%} "
                f"peak {ours_mem:5.1f} GiB")
        if not args.no_hf:
            seconds, hf_mem = measure(hf, args, device, f"HF {label}")
            hf_tps = tokens / seconds
            line += (f" | HF {hf_tps:10,.0f} tok/s MFU {6 * params * hf_tps / H100_BF16_PEAK:6.1%} "
                     f"peak {hf_mem:5.1f} GiB | ours/HF {ours_tps / hf_tps:4.2f}x")
        print(line, flush=True)


def bench_llava(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    vision_name, llm_name = args.llava_models.split(",")
    vision_config, llm_config = vision_preset(vision_name), llm_preset(llm_name)
    n_image, n_text = vision_config.num_image_tokens, args.seq // 2
    text = torch.randint(0, llm_config.vocab_size - 1, (args.batch, n_text), device=device)
    image = torch.full((args.batch, n_image), IMAGE_PLACEHOLDER_ID, device=device)
    ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    labels = torch.cat([torch.full_like(image[:, :1].expand(-1, n_image + 1), -100), text[:, 1:]], dim=1)
    pixels = torch.randn(args.batch, 3, vision_config.image_size, vision_config.image_size, device=device)
    batch = {"input_ids": ids, "labels": labels, "pixel_values": pixels.to(dtype)}
    hf_image_id = llm_config.vocab_size - 1  # an id no text token above uses
    hf_inputs = {"input_ids": ids.masked_fill(ids == IMAGE_PLACEHOLDER_ID, hf_image_id), "labels": labels,
                 "pixel_values": pixels}
    for checkpointing in checkpoint_settings(args):
        def ours():
            llm = LanguageModel(llm_config)
            projector = build_projector("mlp2x_gelu", vision_config.d_model, llm_config.d_model)
            model = LlavaModel(VisionTower(vision_config), projector, llm).to(device)
            if checkpointing:
                enable_checkpointing(llm.blocks)
            return ours_step_fn(model, dtype, batch, args.compile)

        def hf():
            model = hf_llava(vision_name, llm_name, hf_image_id, dtype).to(device).train()
            if checkpointing:
                hf_enable_checkpointing(model)
            return hf_step_fn(model, hf_inputs, dtype)

        label = f"llava {vision_name}+{llm_name} ckpt={'on ' if checkpointing else 'off'}"
        seconds, ours_mem = measure(ours, args, device, f"ours {label}")
        ours_sps = args.batch / seconds
        line = (f"{label} ours {ours_sps:7.1f} samples/s ({args.batch * ids.size(1) / seconds:9,.0f} tok/s) "
                f"peak {ours_mem:5.1f} GiB")
        if not args.no_hf:
            seconds, hf_mem = measure(hf, args, device, f"HF {label}")
            line += (f" | HF {args.batch / seconds:7.1f} samples/s peak {hf_mem:5.1f} GiB "
                     f"| ours/HF {seconds * ours_sps / args.batch:4.2f}x")
        print(line, flush=True)


# ---------------------------------------------------------------- several processes (--nproc)

RESULT = "train_speed result: "


def trainer_worker(args: argparse.Namespace) -> None:
    """Under torchrun: train the first model of --models with the trainer and engine --worker; rank 0 prints the
    median tokens/s (all processes together) of the steps after the warm-up."""
    distributed.setup()
    device = resolve_device("auto")
    torch.manual_seed(0)
    model = LanguageModel(llm_preset(args.models.split(",")[0]))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    steps = args.warmup + args.steps
    world = distributed.world_size()
    config = TrainConfig(steps=steps, global_batch_size=args.batch * world, micro_batch_size=args.batch,
                         warmup_ratio=0.0, log_every=1, device=str(device), distributed=args.worker,
                         activation_checkpointing=args.ckpt == "on")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, forward_loss, lambda epoch: [batch] * world * steps, config, out)
        trainer.fit()
        if distributed.is_main():
            records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
            speeds = sorted(r["tokens_per_s"] for r in records[args.warmup:])
            print(RESULT + json.dumps({"tokens_per_s": speeds[len(speeds) // 2], "processes": world,
                                       "gpu_mem_gib": records[-1]["gpu_mem_gib"]}), flush=True)
    distributed.shutdown()


def scaling(args: argparse.Namespace) -> None:
    """Launch `trainer_worker` under torchrun: plain training on 1 process, the engine on 1 and on --nproc."""
    passed = ["--models", args.models.split(",")[0], "--batch", str(args.batch), "--seq", str(args.seq),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--ckpt", args.ckpt]
    print(f"trainer on {args.models.split(',')[0]}, {args.batch} x {args.seq} tokens per process and step, "
          f"checkpointing {args.ckpt}, torch {torch.__version__}", flush=True)
    print(f"{'engine':8s}{'processes':>10s}{'tok/s':>14s}{'tok/s per GPU':>16s}{'efficiency':>12s}{'peak GiB':>10s}")
    base = {}
    for engine, nproc in (("none", 1), (args.engine, 1), (args.engine, args.nproc)):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   __file__, "--worker", engine, *passed]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode or not lines:
            print(f"{engine} on {nproc}: failed (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
            return
        result = json.loads(lines[-1].removeprefix(RESULT))
        per_gpu = result["tokens_per_s"] / nproc
        base.setdefault(engine, per_gpu)
        efficiency = f"{per_gpu / base[engine]:.1%}" if engine != "none" and nproc > 1 else ""
        at_one = engine != "none" and nproc == 1
        overhead = f"  (world size 1: {per_gpu / base['none']:.3f}x plain training)" if at_one else ""
        mem = "-" if result["gpu_mem_gib"] is None else f"{result['gpu_mem_gib']:.1f}"
        print(f"{engine:8s}{nproc:>10d}{result['tokens_per_s']:>14,.0f}{per_gpu:>16,.0f}{efficiency:>12s}{mem:>10s}"
              f"{overhead}", flush=True)


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
    parser.add_argument("--llava", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--llava-models", default="clip-vit-l-14-336,pythia-410m" if cuda else "clip-tiny,tiny",
                        help="vision tower and LLM presets of the LLaVA step (its text is --seq / 2 tokens)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile a few steps and print where the time goes (by kind, top kernels)")
    parser.add_argument("--ckpt", default="off,on", help="checkpointing settings to run: 'off', 'on' or 'off,on'")
    parser.add_argument("--nproc", type=int, default=0,
                        help="time the trainer on 1 and on this many processes under torchrun (see above)")
    parser.add_argument("--engine", default="ddp", choices=["ddp", "fsdp"], help="the engine of --nproc")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by --nproc for the processes it launches
    args = parser.parse_args()
    if args.worker or args.nproc:
        if args.ckpt not in ("off", "on"):
            raise SystemExit(f"--nproc takes one --ckpt setting, 'off' or 'on', got {args.ckpt!r}")
        return trainer_worker(args) if args.worker else scaling(args)
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
