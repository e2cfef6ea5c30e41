"""Train: one LLaVA stage, a continual task sequence, or a whole experiment.

    python train.py pretrain-text   --config my_stage.json  train.steps=500
    python train.py align           llm=runs/x/text/model vision=runs/x/vision/model train_file=... tokenizer=...
    python train.py continual       --config my_continual.json  methods=[msgm,rehearsal]
    python train.py experiment      --config configs/experiments/demo.json

A config is a JSON file of the stage's (or experiment's) dataclass; `key=value` overrides follow it
(nested keys with dots, lists as [a,b]). `train.resume=true` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import sys

from mllm_cl.config import STAGES, ExperimentConfig, StageConfig, apply_overrides, load_json
from mllm_cl.errors import run_cli
from mllm_cl.experiment import run_experiment
from mllm_cl.stages import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "experiment"])
    parser.add_argument("--config", help="JSON file with the stage's or experiment's settings")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied after the config file")
    args = parser.parse_intermixed_args(argv)

    def run() -> None:
        if args.stage == "experiment":
            config = load_json(ExperimentConfig, args.config) if args.config else ExperimentConfig()
            run_experiment(apply_overrides(config, args.overrides))
        else:
            config = load_json(StageConfig, args.config) if args.config else StageConfig()
            config = apply_overrides(config, [f"stage={args.stage}", *args.overrides])
            print(f"{args.stage}: wrote {run_stage(config)}")

    return run_cli(f"train.py {args.stage}", run)


if __name__ == "__main__":
    sys.exit(main())
