"""One run at a time in an output folder (issue 30): a second run, in another real process, is refused with the
holder's pid; a lock whose holder was killed is taken over; the files of the folder are left as they were."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_cl.config import StageConfig, TrainConfig
from mllm_cl.run_lock import LOCK_FILE, LockedError, acquire, out_dir_lock, release
from mllm_cl.stages import run_stage
from mllm_cl.synthetic import build_world

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from mllm_cl.run_lock import acquire; "
        "acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lock") / "world"
    build_world(folder, seed=0, size="smoke", image_size=16, train_per_task=8, test_per_task=2)
    return folder


def text_stage(world: Path, out: Path, resume: bool = False) -> StageConfig:
    return StageConfig(stage="pretrain-text", out_dir=str(out), llm="tiny", tokenizer=str(world / "tokenizer.json"),
                       train_file=str(world / "text/train.txt"), max_len=64,
                       train=TrainConfig(steps=1, global_batch_size=4, micro_batch_size=4, log_every=1, device="cpu",
                                         resume=resume))


def hold(out: Path) -> subprocess.Popen:
    """Another process that takes out's lock and keeps it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_is_refused_while_the_first_holds_the_folder(world: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run_stage(text_stage(world, out))  # a finished run, which a second one could continue
    before = digest(out)
    holder = hold(out)
    try:
        with pytest.raises(LockedError, match=rf"{out} is in use by another run, process {holder.pid}"):
            run_stage(text_stage(world, out, resume=True))
        assert digest(out) == {**before, LOCK_FILE: digest(out)[LOCK_FILE]}  # the holder's lock, nothing else
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # killed: it never removed its lock; the next run takes over, says so, and continues the finished run
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    run_stage(text_stage(world, out, resume=True))
    assert f"taking over {out / LOCK_FILE}: its holder, process {holder.pid}, is no longer running" in \
        capsys.readouterr().out
    assert not (out / LOCK_FILE).exists()  # released at the end of the run


def test_train_py_names_the_holder_in_one_line(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "held"
    holder = hold(out)
    try:
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), "pretrain-text", f"out_dir={out}",
                                 f"tokenizer={world / 'tokenizer.json'}", f"train_file={world / 'text/train.txt'}",
                                 "max_len=64", "train.steps=1", "train.device=cpu"],
                                capture_output=True, text=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode == 2
    assert result.stderr.strip() == (f"train.py pretrain-text: error: {out} is in use by another run, process "
                                     f"{holder.pid} ({out / LOCK_FILE}); wait for it to end or choose another out_dir")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written beside the holder's lock


def test_the_lock_is_ours_alone_and_released(tmp_path: Path) -> None:
    with out_dir_lock(tmp_path / "a") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(LockedError, match="in use by another run"):
            acquire(tmp_path / "a")  # not even twice by one process
    assert not lock.exists()
    lock.write_text('{"pid": 1')  # half written by a killed run: nobody holds it
    release(lock)  # not ours: left alone
    assert lock.exists()
    assert acquire(tmp_path / "a") == lock
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(LockedError, match="in use by process 1 on host elsewhere"):
        acquire(tmp_path / "b")


def test_a_staging_copy_left_by_a_killed_save_is_removed_on_the_next_start(world: Path, tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "run"
    run_stage(text_stage(world, out))
    stale = out / ".model.x1y2.tmp"  # what staged_folder leaves when killed before its swap
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    run_stage(text_stage(world, out, resume=True))
    assert not stale.exists() and (out / "model").is_dir()
    assert f"removed {stale}, left by a run killed while it saved {out / 'model'}" in capsys.readouterr().out
