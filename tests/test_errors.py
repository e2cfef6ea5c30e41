"""The scripts' one path for user errors and Ctrl-C (mllm_cl.errors.run_cli)."""

import signal
import subprocess
import sys
from pathlib import Path

from mllm_cl.errors import INTERRUPTED, run_cli
from mllm_cl.synthetic import build_world

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_is_one_line_with_the_way_on(capsys) -> None:
    def stopped() -> None:
        raise KeyboardInterrupt

    assert run_cli("tool.py", stopped, interrupted="run it again") == INTERRUPTED == 130
    assert capsys.readouterr().err == "tool.py: interrupted; run it again\n"


def test_ctrl_c_in_a_training_run_says_how_to_resume(tmp_path: Path) -> None:
    world = tmp_path / "world"
    build_world(world, seed=0, size="smoke", image_size=16, train_per_task=8, test_per_task=2)
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), "pretrain-text", f"out_dir={out}",
                            f"tokenizer={world / 'tokenizer.json'}", f"train_file={world / 'text/train.txt'}",
                            "max_len=64", "train.steps=100000", "train.log_every=1", "train.device=cpu"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout is not None
    for line in run.stdout:  # training has begun: the first progress line
        if line.startswith("step "):
            break
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130
    assert err == ("train.py pretrain-text: interrupted; what was saved is kept: run the same command with "
                   "train.resume=true to continue from the last checkpoint (an experiment resumes by itself)\n")
    assert not (out / ".lock").exists()  # the lock went with the run
