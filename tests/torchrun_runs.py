"""Several `train.py STAGE --config FILE` runs in one torchrun launch, one after another: the 2-rank tests pay
for one launch (torchrun, and each rank's start and imports) instead of one per run.

    torchrun --nproc_per_node 2 tests/torchrun_runs.py CODES.json STAGE=CONFIG.json [STAGE=CONFIG.json ...]

Each run is `train.main`, as train.py runs it, except that the process group it joins stays up until the last
run ends (torch cannot reliably join a new one in the same process). Rank 0 marks where each run's output starts
("### run N ###" on stdout and on stderr) and writes the runs' exit codes to CODES.json.
"""

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from mllm_cl import distributed  # noqa: E402


def between_runs(clean: bool = True) -> None:
    """`distributed.shutdown` between runs: the ranks wait for each other after a run that went well, and the
    process group stays."""
    if clean:
        distributed.barrier()
    gc.collect()


def main(codes_file: str, runs: list[str]) -> int:
    main_rank = os.environ["RANK"] == "0"
    shutdown, distributed.shutdown = distributed.shutdown, between_runs
    codes = []
    for index, run in enumerate(runs):
        stage, config = run.split("=", 1)
        if main_rank:
            print(f"### run {index} ###", flush=True)
            print(f"### run {index} ###", file=sys.stderr, flush=True)
        codes.append(train.main([stage, "--config", config]))
    distributed.shutdown = shutdown
    shutdown()
    if main_rank:
        Path(codes_file).write_text(json.dumps(codes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
