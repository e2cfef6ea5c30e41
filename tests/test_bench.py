"""The training benchmark runs end to end at tiny shapes on the CPU: ours, transformers' models and the profile.

It prints figures and never asserts a speed; this only checks that every part of it runs."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_speed  # noqa: E402


def test_train_speed_runs_ours_hf_and_the_profile(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--models", "tiny", "--batch", "2", "--seq", "32",
                                      "--steps", "1", "--warmup", "0", "--ckpt", "on", "--profile"])
    train_speed.main()
    out = capsys.readouterr().out
    assert "failed" not in out, out
    rows = [line for line in out.splitlines() if "ours/HF" in line]
    assert len(rows) == 2 and rows[0].startswith("tiny ckpt=on") and rows[1].startswith("llava clip-tiny+tiny"), out
    for label in ("ours tiny", "HF tiny", "ours llava", "HF llava"):
        assert f"profile {label}" in out, out
    assert "matmul" in out and "top 15" in out


def test_train_speed_rejects_a_bad_checkpointing_setting(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--ckpt", "maybe"])
    with pytest.raises(SystemExit, match="--ckpt takes"):
        train_speed.main()


def test_train_speed_nproc_times_the_trainer_on_one_and_two_processes(monkeypatch, capsys) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--nproc", "2", "--models", "tiny", "--batch", "2", "--seq",
                                      "32", "--steps", "2", "--warmup", "1", "--ckpt", "off"])
    train_speed.main()
    out = capsys.readouterr().out
    assert "failed" not in out, out
    rows = [line.split() for line in out.splitlines() if line.startswith(("none ", "ddp "))]
    assert [(row[0], row[1]) for row in rows] == [("none", "1"), ("ddp", "1"), ("ddp", "2")], out
    assert "plain training)" in out and rows[2][4].endswith("%"), out
