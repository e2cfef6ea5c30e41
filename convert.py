"""Convert a model folder whose weights are PyTorch pickles (`pytorch_model.bin`, or `pytorch_model-*.bin` with
`pytorch_model.bin.index.json`, as the original LLaVA-1.5 releases come) into safetensors, which this project reads.

    python convert.py SRC_DIR OUT_DIR

Each .bin is read with torch.load(weights_only=True): a file holding anything but tensors is refused, never
unpickled. OUT_DIR gets model.safetensors (or shards and model.safetensors.index.json mirroring the .bin index) and
a copy of every other file of SRC_DIR (config.json, tokenizer files, ...), and, when SRC_DIR has only SentencePiece's
tokenizer.model, the equivalent tokenizer.json (`mllm_cl.sentencepiece_model`). OUT_DIR must be new or empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_cl.bin_weights import convert_bin_folder
from mllm_cl.errors import run_cli
from mllm_cl.tokenizer import write_tokenizer_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    def run() -> None:
        folder = convert_bin_folder(args.src_dir, args.out_dir, convert_tokenizer=write_tokenizer_json)
        print(f"wrote {folder} (safetensors)")

    return run_cli("convert.py", run)


if __name__ == "__main__":
    sys.exit(main())
