"""The front door: README.md's code map, links, make targets and commands, and its stage-by-stage walk-through run
as written on the smoke world."""

import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

import consolidate
import eval as eval_cli
import train
from mllm_cl.synthetic import main as world_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b")  # STAGE, MODEL_DIR: a command to fill in, checked with --help


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _code(text: str) -> list[str]:
    """The lines of every fenced bash block and every inline code span, one command each."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return [line for line in lines + spans if line]


def _python_commands(text: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in _code(text) if line.startswith("python ")]


def test_the_readme_is_a_front_door() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_the_code_map_names_every_module() -> None:
    code_map = _section(README.read_text(), "How to read the code")
    package = ROOT / "mllm_cl"
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.name == "__init__.py" and relative.parent != Path("methods"):
            continue
        assert f"{relative.name}" in code_map, f"the code map does not name mllm_cl/{relative}"
    for sub in (p for p in package.iterdir() if (p / "__init__.py").is_file()):
        assert f"`mllm_cl/{sub.name}/`" in code_map, f"the code map does not name mllm_cl/{sub.name}/"


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_to_a_file_in_the_repository(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (page.parent / target.split("#")[0]).resolve()
        assert resolved.exists() and ROOT in resolved.parents, f"{page.relative_to(ROOT)} links to missing {target}"


def test_every_make_target_named_exists() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = {line.split()[1] for line in _code(README.read_text()) if line.startswith("make ")}
    assert {"setup", "test", "smoke", "demo", "data", "experiment"} <= named
    assert named <= targets, f"the README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_the_ci_runs_the_readmes_two_commands() -> None:
    setup = re.search(r"```bash\n(.*?)```", _section(README.read_text(), "Set up and test"), re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in setup.splitlines()]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set", "cd"))]
    assert commands == ci == ["make setup", "make test"]


def test_every_python_command_parses(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """train.py commands run as a dry run (config files read, overrides applied); a command with placeholders
    (STAGE, MODEL_DIR) and the other scripts answer --help."""
    commands = _python_commands(README.read_text())
    assert len(commands) >= 10
    monkeypatch.chdir(ROOT)
    for argv in commands:
        script, args = argv[0], argv[1:]
        assert (ROOT / script).is_file(), f"the README runs {script}, which does not exist"
        if script == "train.py" and not PLACEHOLDER.search(" ".join(args)):
            assert train.main([*args, "--dry-run"]) == 0, f"python {' '.join(argv)}: {capsys.readouterr().err}"
            continue
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        assert done.value.code == 0, f"python {script} --help failed"
    capsys.readouterr()


def test_the_stage_walk_through_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Every command of "One stage at a time", in order, from a fresh folder holding only configs/stages/."""
    block = re.search(r"```bash\n(.*?)```", _section(README.read_text(), "One stage at a time"), re.DOTALL).group(1)
    commands = _python_commands(f"```bash\n{block}```")
    assert [argv[0] for argv in commands] == ["data/synthetic_world.py"] + ["train.py"] * 5 + ["eval.py",
                                                                                              "consolidate.py"]
    shutil.copytree(ROOT / "configs" / "stages", tmp_path / "configs" / "stages")
    monkeypatch.chdir(tmp_path)
    mains = {"train.py": train.main, "eval.py": eval_cli.main, "consolidate.py": consolidate.main}
    for script, *args in commands:
        if script == "data/synthetic_world.py":
            world_main(args)
        else:
            assert mains[script](args) == 0, f"python {script} {' '.join(args)}:\n{capsys.readouterr().err}"
    runs = tmp_path / "runs" / "stages"
    for stage in ("text", "vision", "align", "finetune"):
        assert (runs / stage / "model" / "config.json").is_file()
    results = json.loads((runs / "continual" / "results.json").read_text())
    assert results["methods"] == ["msgm", "rehearsal"] and len(results["after_task"]) == 2
    assert set(results["after_task"][-1]["vl"]) == {"color", "size"}
    scores = json.loads((runs / "scores.json").read_text())
    assert {"facts_mc", "last_word", "color", "size"} <= set(scores)
    assert (runs / "sac" / "config.json").is_file()
