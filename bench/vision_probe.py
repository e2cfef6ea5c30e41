"""Which image attributes does a frozen vision tower's token set carry? Linear probes (mllm_cl/probe.py).

    python bench/vision_probe.py --vision runs/demo/pretrain_vision/model          # the demo's trained tower
    python bench/vision_probe.py --vision runs/demo/pretrain_vision/model --json probe.json
    python bench/vision_probe.py                                                   # untrained clip-tiny only
    python bench/vision_probe.py --vision runs/demo/pretrain_vision/model --probe logistic --attributes count

Prints one row per attribute and one column per feature source: the raw pixels, an untrained tower of the same
shape, and the given tower, each read out flat (the projector's view) and averaged over tokens (a bag's view).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.config import VISION_PRESETS, vision_preset  # noqa: E402
from mllm_cl.probe import ATTRIBUTES, PROBES, format_table, probe_towers  # noqa: E402
from mllm_cl.vision import VisionTower  # noqa: E402
from mllm_cl.weights import load_vision_tower  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", default="", help="a CLIP tower folder to probe (default: none, only the baselines)")
    parser.add_argument("--preset", default="clip-tiny", choices=sorted(VISION_PRESETS),
                        help="shape of the untrained baseline tower (default: clip-tiny)")
    parser.add_argument("--attributes", nargs="*", default=list(ATTRIBUTES), choices=list(ATTRIBUTES))
    parser.add_argument("--train", type=int, default=600, help="scenes to fit each probe on")
    parser.add_argument("--val", type=int, default=200, help="scenes to choose the ridge strength on")
    parser.add_argument("--test", type=int, default=400, help="scenes to score on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", default="ridge", choices=list(PROBES),
                        help="ridge: closed-form least squares to one-hot labels (default); logistic: multinomial "
                             "logistic regression by L-BFGS, slower, fairer to ordered attributes such as count")
    parser.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    towers: dict[str, VisionTower | None] = {} if args.no_pixels else {"pixels": None}
    towers["untrained"] = VisionTower(vision_preset(args.preset))
    if args.vision:
        try:
            towers["trained"] = load_vision_tower(args.vision)
        except (OSError, ValueError) as error:
            parser.error(f"--vision {args.vision}: {error}")
    size = towers["trained" if args.vision else "untrained"].config.image_size
    start = time.perf_counter()
    columns = probe_towers(towers, tuple(args.attributes), n_train=args.train, n_val=args.val, n_test=args.test,
                           seed=args.seed, image_size=size, probe=args.probe)
    print(format_table(columns))
    print(f"\n{args.probe} probe; {args.train} / {args.val} / {args.test} scenes per attribute "
          f"(fit / penalty choice / test); {time.perf_counter() - start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({name: [asdict(r) for r in results]
                                               for name, results in columns.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
