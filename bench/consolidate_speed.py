"""Time Spectral-Aware Consolidation over every parameter of Pythia-shaped models (random weights, random update).

    python bench/consolidate_speed.py                      # 160M and 410M on the CPU, 1.4B on the GPU if present
    python bench/consolidate_speed.py --models pythia-160m --device cpu

Prints seconds for the SVDs, for one alpha, and for a sweep of 11 alphas (one set of SVDs + 11 rebuilds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.config import LLMConfig, llm_preset  # noqa: E402
from mllm_cl.consolidation import modelmix  # noqa: E402
from mllm_cl.spectral import decompose_updates, sac_from_spectra  # noqa: E402


def parameter_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter shape of the model in its Hugging Face layout (buffers left out)."""
    d, f, v, kv = config.d_model, config.d_ff, config.vocab_size, config.n_kv_head * config.head_dim
    if config.arch == "gpt_neox":
        shapes = {"gpt_neox.embed_in.weight": (v, d), "gpt_neox.final_layer_norm.weight": (d,),
                  "gpt_neox.final_layer_norm.bias": (d,), "embed_out.weight": (v, d)}
        for i in range(config.n_layer):
            p = f"gpt_neox.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                shapes.update({p + norm + ".weight": (d,), p + norm + ".bias": (d,)})
            for name, (rows, cols) in {"attention.query_key_value": (3 * d, d), "attention.dense": (d, d),
                                       "mlp.dense_h_to_4h": (f, d), "mlp.dense_4h_to_h": (d, f)}.items():
                shapes.update({p + name + ".weight": (rows, cols), p + name + ".bias": (rows,)})
        return shapes
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return shapes


def bench(name: str, device: str, dtype: torch.dtype, points: int) -> None:
    shapes = parameter_shapes(llm_preset(name))
    g = torch.Generator().manual_seed(0)
    old = {k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}
    new = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in old.items()}
    params = sum(t.numel() for t in old.values())
    matrices = sum(len(s) >= 2 for s in shapes.values())
    print(f"{name}: {params / 1e6:.0f}M parameters, {matrices} matrices, {dtype}, SVDs on {device}", flush=True)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    start = time.perf_counter()
    modelmix(old, new, 0.2)
    print(f"  modelmix, one alpha:        {time.perf_counter() - start:7.1f} s", flush=True)
    start = time.perf_counter()
    spectra = decompose_updates(old, new, device=device, log=lambda line: print(line, flush=True))
    sync()
    svd_seconds = time.perf_counter() - start
    print(f"  SVDs of every update:       {svd_seconds:7.1f} s", flush=True)
    alphas = [i / (points - 1) for i in range(points)] if points > 1 else [0.2]
    start = time.perf_counter()
    for alpha in alphas:
        sac_from_spectra(old, new, spectra, alpha)
    sync()
    rebuild_seconds = time.perf_counter() - start
    middle = [a for a in alphas if 0 < a < 1]  # the endpoints are copies
    per_alpha = rebuild_seconds / max(1, len(middle))
    print(f"  SAC, one alpha:             {svd_seconds + per_alpha:7.1f} s  (SVDs + {per_alpha:.1f} s rebuild)")
    print(f"  SAC, sweep of {len(alphas):2d} alphas:    {svd_seconds + rebuild_seconds:7.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma list of presets (default: pythia-160m,pythia-410m on the CPU, "
                                         "and pythia-1.4b on the GPU if there is one)")
    parser.add_argument("--device", help="where the SVDs run (default: cpu for the CPU models, cuda for 1.4B)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--points", type=int, default=11, help="alphas in the sweep (default 11: 0, 0.1, ..., 1)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if args.models:
        runs = [(name, args.device or "cpu") for name in args.models.split(",")]
    else:
        runs = [("pythia-160m", args.device or "cpu"), ("pythia-410m", args.device or "cpu")]
        if torch.cuda.is_available():
            runs.append(("pythia-1.4b", args.device or "cuda"))
    for name, device in runs:
        bench(name, device, dtype, args.points)


if __name__ == "__main__":
    main()
