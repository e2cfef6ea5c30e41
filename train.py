"""Train: one LLaVA stage, a continual task sequence, or a whole experiment.

    python train.py pretrain-text   --config configs/stages/pretrain-text.json  train.steps=500
    python train.py align           llm=runs/x/text/model vision=runs/x/vision/model train_file=... tokenizer=...
    python train.py continual       --config configs/stages/my_tasks.json  methods=[msgm,rehearsal]
    python train.py experiment      --config configs/experiments/demo.json
    python train.py finetune        --config configs/stages/finetune.json --dry-run   (the settings, not run)
    torchrun --nproc_per_node 4 train.py finetune --config configs/stages/finetune.json                 (DDP)
    torchrun --nproc_per_node 4 train.py finetune --config configs/stages/finetune.json train.distributed=fsdp  (FSDP2)

A config is a JSON file of the stage's (or experiment's) dataclass; `key=value` overrides follow it
(nested keys with dots, lists as [a,b]). `train.resume=true` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from mllm_cl import distributed
from mllm_cl.config import STAGES, ExperimentConfig, StageConfig, apply_overrides, load_json, to_dict
from mllm_cl.config_help import settings_help
from mllm_cl.errors import rank_prefix, run_cli
from mllm_cl.experiment import run_experiment
from mllm_cl.stages import run_stage


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    stage = next((a for a in argv if not a.startswith("-")), None)
    epilog = None
    if stage in (*STAGES, "experiment"):
        epilog = (settings_help(ExperimentConfig) if stage == "experiment"
                  else settings_help(StageConfig, skip=("stage",)))
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "experiment"],
                        help="the stage to run; `train.py STAGE --help` lists its settings")
    parser.add_argument("--config", help="JSON file with the stage's or experiment's settings")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied after the config file")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the settings the run would use (config file + overrides, as JSON) and stop")
    args = parser.parse_intermixed_args(argv)

    def run() -> None:
        if args.stage == "experiment":
            config = load_json(ExperimentConfig, args.config) if args.config else ExperimentConfig()
            config = apply_overrides(config, args.overrides)
        else:
            config = load_json(StageConfig, args.config) if args.config else StageConfig()
            config = apply_overrides(config, [f"stage={args.stage}", *args.overrides])
        if args.dry_run:
            print(json.dumps(to_dict(config), indent=2))
            return
        if args.stage == "experiment":
            distributed.setup(config.device)
            run_experiment(config)
        else:
            distributed.setup(config.train.device)
            print(f"{args.stage}: wrote {run_stage(config)}")

    code = 1
    try:
        code = run_cli(f"train.py {args.stage}", run, interrupted="what was saved is kept: run the same command with "
                       "train.resume=true to continue from the last checkpoint (an experiment resumes by itself)")
    except dist.DistError as e:  # a collective failed: another rank stopped (an error, a kill) or cannot be reached
        print(f"{rank_prefix()}train.py {args.stage}: error: lost contact with the other processes; one of them "
              f"stopped or was killed (its own message says why). Resume from the last checkpoint with "
              f"train.resume=true. ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        code = 3
    finally:
        distributed.shutdown(clean=code == 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
