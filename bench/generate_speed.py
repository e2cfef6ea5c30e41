"""Greedy decoding speed: our static-KV-cache `generate` against Hugging Face `generate()`, same random weights.

    python bench/generate_speed.py                       # Pythia-410M shape in bf16 on CUDA, a tiny shape on CPU
    python bench/generate_speed.py --preset smollm2-135m --batch-sizes 1 8

Prints new tokens/s for both and their ratio, and how many generated tokens agree; never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.config import llm_preset  # noqa: E402
from mllm_cl.generation import generate  # noqa: E402
from mllm_cl.llm import LanguageModel, count_parameters  # noqa: E402
from mllm_cl.weights import save_llm  # noqa: E402


def build_pair(preset: str, device: torch.device, dtype: torch.dtype):
    """Our model with random weights, and a transformers model holding the very same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        ours = LanguageModel(llm_preset(preset)).to(dtype).eval()
    with tempfile.TemporaryDirectory() as folder:  # through the HF layout on disk, as a user would
        save_llm(ours, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return ours, hf.to(device).eval()


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pythia-410m" if cuda else "pythia-14m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)

    ours, hf = build_pair(args.preset, device, dtype)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{args.preset} ({count_parameters(ours) / 1e6:.0f}M params), {args.dtype}, {name}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, torch {torch.__version__}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>7} {'tokens agreeing':>16}")
    for batch in args.batch_sizes:
        ids = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_len), device=device)
        mask = torch.ones_like(ids)

        def run_ours(n: int = args.new_tokens) -> torch.Tensor:
            return generate(ours, ids, max_new_tokens=n).tokens

        def run_hf(n: int = args.new_tokens) -> torch.Tensor:
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)
            return out[:, args.prompt_len:]

        run_ours(4), run_hf(4)  # warm-up: kernels, allocator
        ours_s, ours_tokens = timed(run_ours, device)
        hf_s, hf_tokens = timed(run_hf, device)
        new = batch * args.new_tokens
        agree = (ours_tokens == hf_tokens).float().mean().item()
        print(f"{batch:>5} {new / ours_s:>11.0f} {new / hf_s:>10.0f} {hf_s / ours_s:>6.1f}x {agree:>15.1%}")


if __name__ == "__main__":
    main()
