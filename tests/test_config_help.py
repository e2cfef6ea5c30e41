"""`train.py STAGE --help` lists every setting with its default and its line of help, read from config.py."""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mllm_cl.config import ExperimentConfig, StageConfig
from mllm_cl.config_help import field_comments, settings, settings_help

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    depth: int = 2  # how deep


@dataclass
class Outer:
    plain: str = ""
    # a comment block
    # over two lines
    listed: list[int] = field(default_factory=lambda: [1, 2])
    inline: float = 0.5  # on its own line
    first: Inner = field(default_factory=Inner)
    second: Inner = field(default_factory=lambda: Inner(depth=3))


def test_comments_come_from_the_line_or_the_block_above() -> None:
    assert field_comments(Outer) == {"listed": "a comment block over two lines", "inline": "on its own line"}


def test_nested_settings_are_dotted_and_a_repeated_type_is_listed_once() -> None:
    rows = {key: (default, text) for key, default, text in settings(Outer())}
    assert rows["plain"] == ('""', "") and rows["listed"][0] == "[1, 2]" and rows["inline"][0] == "0.5"
    assert rows["first.depth"] == ("2", "how deep")
    assert "second.depth" not in rows
    assert rows["second.*"][0] == '{"depth": 3}' and "the keys of first.*" in rows["second.*"][1]


@pytest.mark.parametrize("config", [StageConfig, ExperimentConfig])
def test_every_setting_has_a_line_of_help(config: type) -> None:
    missing = [key for key, _, text in settings(config()) if not text]
    assert not missing, f"settings without a comment in mllm_cl/config.py: {missing}"


def test_train_py_stage_help_lists_the_settings() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "continual", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("  train.micro_batch_size = 8")
    assert "samples per forward" in lines[at + 1]
    assert "  method_options = {}" in lines and "  eval.vl_limit = 0" in lines
    assert not any(line.startswith("  stage =") for line in lines)  # the STAGE argument sets it
    assert settings_help(StageConfig).count("\n  ") >= len(settings(StageConfig()))
