"""Per-GPU memory of a training step on paper (mllm_cl/memory_plan.py): what fits on how many GPUs.

    python bench/memory_plan.py                          # Pythia-1.4B/2.8B and Vicuna-7B LLaVA, 2048 tokens x 1
    python bench/memory_plan.py --tokens 1024 --batch 4 --gpu-gib 40

Prints GiB per GPU for full fine-tuning and LoRA, with and without activation checkpointing, under DDP and FSDP2,
on 1/2/4/8 GPUs; "(no)" marks a cell over the GPU's memory less 10% headroom. Nothing runs on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.memory_plan import plan_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence (LLaVA: 576 image + text)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch on each GPU")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--lora-rank", type=int, default=128)
    args = parser.parse_args()
    print(plan_table(tokens=args.tokens, batch=args.batch, gpu_gib=args.gpu_gib, lora_rank=args.lora_rank))


if __name__ == "__main__":
    main()
