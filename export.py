"""Export a LLaVA model to the layout transformers, vLLM and lmms-eval load (`LlavaForConditionalGeneration`).

    python export.py MODEL_DIR OUT_DIR [--template vicuna_v1] [--vision CLIP_DIR]

MODEL_DIR is a LLaVA folder in any layout this project reads (ours, transformers', or the original LLaVA
repository's with --vision naming its CLIP folder). OUT_DIR gets the weights, config.json, the tokenizer with
an `<image>` token, the chat template the model was trained with (`--template`, default: the one its folder
records, else pythia, as training and eval.py assume) and the image processor's settings; a MODEL_DIR in
transformers' layout keeps its own chat template and processor settings unless --template is given. The chat
template leaves out the leading token the tokenizer adds itself (LLaMA's <s>), so rendering it to text and then
calling the processor, as llava-hf's model card does, gives our prompt's ids. OUT_DIR must be new or empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_cl.conversation import TEMPLATES
from mllm_cl.errors import run_cli
from mllm_cl.llava import llava_layout, load_llava, save_llava, tokenizer_folder
from mllm_cl.model_folder import ModelFolderError, read_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--template", choices=sorted(TEMPLATES), help="the chat template the model was trained with")
    parser.add_argument("--vision", type=Path, help="the CLIP folder of an original-LLaVA checkpoint")
    args = parser.parse_args(argv)

    def run() -> None:
        out = args.out_dir
        if out.is_file() or (out.is_dir() and any(out.iterdir())):
            raise ModelFolderError(f"{out} exists and is not an empty folder: choose a new folder (nothing is "
                                   "replaced)")
        model = load_llava(args.model_dir, vision=args.vision)
        from_hf = args.template is None and llava_layout(read_config(args.model_dir)) == "hf"
        folder = save_llava(model, out, tokenizer_from=tokenizer_folder(args.model_dir), layout="hf",
                            template=args.template, keep_from=args.model_dir if from_hf else None)
        print(f"wrote {folder} (LlavaForConditionalGeneration layout)")

    return run_cli("export.py", run)


if __name__ == "__main__":
    sys.exit(main())
