"""Nothing the user owns is overwritten, and no run silently does something else than asked (issue 16's data
loss and silent-run cases): each case checks the message names the problem and that no file changed."""

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_consolidate_cli import refused, tiny_pair

import consolidate
import eval as eval_cli
import train
from mllm_cl.config import ConfigError, EvalSpec, StageConfig, StageError, TaskSpec, TrainConfig, to_dict
from mllm_cl.data import DataError
from mllm_cl.device import resolve_device
from mllm_cl.stages import run_stage
from mllm_cl.synthetic import build_world


ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file below `path` (or of the file itself), by relative name."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- consolidate.py --out

@pytest.mark.parametrize("target", ["old", "new", "old/sub"])
def test_consolidate_refuses_an_out_over_either_model(tmp_path: Path, target: str, capsys) -> None:
    tiny_pair(tmp_path)
    before = {**digest(tmp_path / "old"), **digest(tmp_path / "new")}
    refused(capsys, [str(tmp_path / "old"), str(tmp_path / "new"), "--out", str(tmp_path / target)],
            f"--out .*{target}.* would write over .*(old|new)")
    assert {**digest(tmp_path / "old"), **digest(tmp_path / "new")} == before


def test_consolidate_refuses_a_non_empty_folder_or_a_file(tmp_path: Path, capsys) -> None:
    tiny_pair(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("months of work")
    (tmp_path / "file.txt").write_text("keep me")
    for out in ("notes", "file.txt"):
        before = digest(tmp_path / out)
        refused(capsys, [str(tmp_path / "old"), str(tmp_path / "new"), "--out", str(tmp_path / out)],
                f"--out .*{out} exists and is not an empty folder")
        assert digest(tmp_path / out) == before
    (tmp_path / "empty").mkdir()
    consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--out", str(tmp_path / "empty"),
                      "--device", "cpu"])
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_eval_command_runs_without_a_shell(tmp_path: Path) -> None:
    tiny_pair(tmp_path)
    out = tmp_path / "sweep $(touch PWNED)"
    script = "import sys, json; json.dump({'t': {'acc': 1.0}}, open(sys.argv[2], 'w'))"
    command = f'{sys.executable} -c "{script}" "{{model}}" "{{json}}"'  # quoted placeholders, as users write them
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        consolidate.main([str(tmp_path / "old"), str(tmp_path / "new"), "--method", "modelmix", "--sweep", "0,1",
                          "--out", str(out), "--eval-cmd", command])
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()
    assert json.loads((out / "sweep.json").read_text())["points"][1]["results"] == {"t": 1.0}


# ---------------------------------------------------------------- eval.py --json

def test_eval_json_to_an_unwritable_path_fails_before_evaluating(tmp_path: Path, capsys) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    code = eval_cli.main([str(tmp_path / "no_model_here"), "--suite", "nl", "--json",
                          str(tmp_path / "file.txt" / "scores.json")])
    assert code == 2 and "scores.json" in capsys.readouterr().err  # the path, not the missing model
    assert (tmp_path / "file.txt").read_text() == "not a folder"


@pytest.mark.parametrize("inside", ["config.json", "model.safetensors", "scores/new.json"])
def test_eval_json_into_the_model_folder_is_refused(tmp_path: Path, capsys, inside: str) -> None:
    tiny_pair(tmp_path)
    before = digest(tmp_path / "old")
    code = eval_cli.main([str(tmp_path / "old"), "--suite", "nl", "--json", str(tmp_path / "old" / inside)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("eval.py: error: --json ") and "would write inside the model folder" in err
    assert digest(tmp_path / "old") == before  # config.json and the weights untouched, nothing added


# ---------------------------------------------------------------- train.py out_dir

@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("safety") / "world"
    build_world(folder, seed=0, size="smoke", image_size=16, train_per_task=8, test_per_task=2)
    return folder


def text_stage(world: Path, out: Path, **train: object) -> StageConfig:
    settings = dict(steps=1, global_batch_size=4, micro_batch_size=4, log_every=1, device="cpu")
    return StageConfig(stage="pretrain-text", out_dir=str(out), llm="tiny", tokenizer=str(world / "tokenizer.json"),
                       train_file=str(world / "text/train.txt"), max_len=64,
                       train=TrainConfig(**{**settings, **train}))


def test_a_model_no_run_left_is_never_replaced(world: Path, tmp_path: Path) -> None:
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "config.json").write_text('{"precious": true}')
    before = digest(tmp_path / "mine")
    for resume in (False, True):
        with pytest.raises(StageError, match="holds model/ from something other than a run of this stage"):
            run_stage(text_stage(world, tmp_path / "mine", resume=resume))
        assert digest(tmp_path / "mine") == before


def test_a_finished_or_refused_run_is_left_as_it_is(world: Path, tmp_path: Path) -> None:
    run_stage(text_stage(world, tmp_path / "run"))
    before = digest(tmp_path / "run")
    with pytest.raises(StageError, match=r"holds an earlier run \(model.*set train.resume=true"):
        run_stage(text_stage(world, tmp_path / "run"))
    with pytest.raises(StageError, match=r"other settings \(saved, now\): \{'train.lrs"):
        run_stage(text_stage(world, tmp_path / "run", lrs={"": 5e-4}, resume=True))
    assert digest(tmp_path / "run") == before  # stage_config.json included


def test_an_input_inside_the_outputs_and_an_empty_out_dir_are_refused(world: Path, tmp_path: Path) -> None:
    text = run_stage(text_stage(world, tmp_path / "text"))
    before = digest(text)
    finetune_into_init = StageConfig(stage="align", out_dir=str(text.parent), llm=str(text), vision="clip-tiny",
                                     train_file=str(world / "align.json"), image_folder=str(world),
                                     train=TrainConfig(steps=1, device="cpu", resume=True))
    with pytest.raises(StageError, match=r"llm=.*lies inside .*where this stage writes its model"):
        run_stage(finetune_into_init)
    assert digest(text) == before
    with pytest.raises(StageError, match="out_dir is empty"):
        run_stage(text_stage(world, Path("")).__class__(**{**text_stage(world, tmp_path).__dict__, "out_dir": ""}))


def test_continual_rerun_with_other_settings_is_refused(world: Path, tmp_path: Path) -> None:
    text = run_stage(text_stage(world, tmp_path / "text"))
    aligned = run_stage(StageConfig(stage="align", out_dir=str(tmp_path / "align"), llm=str(text),
                                    vision="clip-tiny", tokenizer=str(world / "tokenizer.json"), max_len=160,
                                    train_file=str(world / "align.json"), image_folder=str(world),
                                    train=TrainConfig(steps=1, global_batch_size=4, micro_batch_size=4,
                                                      device="cpu")))
    task = TaskSpec(name="color", train=str(world / "tasks/color/train.json"),
                    test=str(world / "tasks/color/test.json"), image_folder=str(world))

    def continual(methods: list[str], resume: bool) -> StageConfig:
        return StageConfig(stage="continual", out_dir=str(tmp_path / "cl"), init=str(aligned), tasks=[task],
                           methods=methods, max_len=160, eval=EvalSpec(vl_limit=1, batch_size=2, max_new_tokens=1),
                           train=TrainConfig(steps=1, global_batch_size=4, micro_batch_size=4, device="cpu",
                                             resume=resume))

    run_stage(continual(["naive"], resume=False))
    before = digest(tmp_path / "cl")
    with pytest.raises(StageError, match=r"other settings .*'methods': \(\['naive'\], \['lora'\]\)"):
        run_stage(continual(["lora"], resume=True))
    with pytest.raises(StageError, match="set train.resume=true"):
        run_stage(continual(["naive"], resume=False))
    assert digest(tmp_path / "cl") == before
    run_stage(continual(["naive"], resume=True))  # the same settings continue (here: nothing left to do)


def test_pretrain_text_takes_the_tokenizer_of_its_llm_folder_not_the_working_directory(world: Path,
                                                                                       tmp_path: Path) -> None:
    text = run_stage(text_stage(world, tmp_path / "text"))
    (tmp_path / "tokenizer.json").write_text('{"decoy": true}')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        again = run_stage(StageConfig(stage="pretrain-text", out_dir=str(tmp_path / "again"), llm=str(text),
                                      train_file=str(world / "text/train.txt"), max_len=64,
                                      train=TrainConfig(steps=1, global_batch_size=4, micro_batch_size=4,
                                                        device="cpu")))
    finally:
        os.chdir(cwd)
    assert (again / "tokenizer.json").read_bytes() == (text / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------- settings that would train wrongly

@pytest.mark.parametrize("override, named", [
    ("train.lrs={\"\":-1e-3}", "lrs"), ("train.min_lr_ratio=-0.5", "min_lr_ratio"),
    ("train.warmup_ratio=-0.1", "warmup_ratio"), ("train.weight_decay=-0.1", "weight_decay"),
    ("train.max_grad_norm=-1", "max_grad_norm"), ("train.max_grad_norm=NaN", "max_grad_norm"),
    ("train.betas=[0.9]", "betas"), ("train.precision=fp8", "precision"), ("train.steps=-3", "steps"),
    ("train.micro_batch_size=0", "micro_batch_size"), ("train.device=tpu7", "device"),
])
def test_settings_that_would_train_wrongly_are_refused(tmp_path: Path, capsys, override: str, named: str) -> None:
    code = train.main(["finetune", f"out_dir={tmp_path / 'x'}", "init=nowhere", "train_file=nowhere.json", override])
    assert code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cuda_on_a_machine_without_it_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")


def test_a_run_refused_for_bad_input_can_be_rerun_with_the_input_fixed(world: Path, tmp_path: Path) -> None:
    broken = text_stage(world, tmp_path / "run")
    broken.train_file = str(world / "no_such_corpus.txt")
    with pytest.raises(DataError, match="no_such_corpus.txt"):
        run_stage(broken)
    assert (run_stage(text_stage(world, tmp_path / "run")) / "model.safetensors").is_file()


# ---------------------------------------------------------------- inputs that used to crash deep inside

def test_max_len_beyond_the_llm_and_a_tokenizer_beyond_its_vocabulary(world: Path, tmp_path: Path, capsys) -> None:
    common = ["pretrain-text", "llm=tiny", f"tokenizer={world / 'tokenizer.json'}",
              f"train_file={world / 'text/train.txt'}", "train.steps=1", "train.device=cpu"]
    assert train.main([*common, f"out_dir={tmp_path / 'a'}", "max_len=100000"]) == 2
    assert "max_len=100000 is longer than llm=tiny's max_seq_len=512" in capsys.readouterr().err
    text = run_stage(text_stage(world, tmp_path / "text"))
    big = tmp_path / "big_tokenizer.json"
    spec = json.loads((world / "tokenizer.json").read_text())
    spec["model"]["vocab"].update({f"extra{i}": 5000 + i for i in range(3)})  # ids past the LLM's embeddings
    big.write_text(json.dumps(spec))
    assert train.main(["pretrain-text", f"llm={text}", f"tokenizer={big}", f"train_file={world / 'text/train.txt'}",
                       f"out_dir={tmp_path / 'b'}", "train.steps=1", "train.device=cpu", "max_len=64"]) == 2
    assert "embeddings: use the tokenizer the LLM was trained with" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_a_message() -> None:
    from mllm_cl.config import LLMConfig
    from mllm_cl.generation import GenerationLengthError, generate
    from mllm_cl.llm import LanguageModel

    model = LanguageModel(LLMConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=8, d_ff=16,
                                    max_seq_len=16))
    with pytest.raises(GenerationLengthError, match="12 tokens plus max_new_tokens=8 is longer than the model's "
                                                    "max_seq_len=16"):
        generate(model, torch.zeros(1, 12, dtype=torch.long), max_new_tokens=8)


def test_unreadable_places_and_a_corrupt_checkpoint_are_messages(world: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a_file").write_text("x")
    assert train.main(["pretrain-text", f"out_dir={tmp_path / 'a_file' / 'run'}", "llm=tiny",
                       f"tokenizer={world / 'tokenizer.json'}", f"train_file={world / 'text/train.txt'}",
                       "train.device=cpu"]) == 2
    assert "a_file" in capsys.readouterr().err
    cfg = text_stage(world, tmp_path / "run", steps=2, save_every=1)
    run_stage(cfg)
    (tmp_path / "run" / "checkpoint" / "weights.safetensors").write_bytes(b"\x00garbage")
    before = digest(tmp_path / "run")
    code = train.main(["pretrain-text", f"out_dir={tmp_path / 'run'}", "llm=tiny", f"tokenizer={cfg.tokenizer}",
                       f"train_file={cfg.train_file}", "max_len=64", "train.steps=2", "train.global_batch_size=4",
                       "train.micro_batch_size=4", "train.log_every=1", "train.save_every=1", "train.device=cpu",
                       "train.resume=true"])
    assert code == 2 and "weights.safetensors" in capsys.readouterr().err
    assert digest(tmp_path / "run") == before


def test_debug_variable_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLLM_CL_DEBUG", "1")
    with pytest.raises(StageError, match="needs init"):
        train.main(["finetune", f"out_dir={tmp_path / 'x'}", "train_file=x.json"])


@pytest.mark.parametrize("change, named", [
    ({"hidden_size": "128"}, r"d_model must be a positive integer \(below 2\^31\), got '128'"),
    ({"num_attention_heads": 0}, r"n_head must be a positive integer \(below 2\^31\), got 0"),
    ({"rope_parameters": "yes"}, "config.json: a field has the wrong type or value"),
    ("a list", "must hold a JSON object of settings, not a list"),
])
def test_wrongly_typed_config_json_fields_name_the_file(tmp_path: Path, change, named: str) -> None:
    from mllm_cl.config import LLMConfig
    from mllm_cl.llm import LanguageModel
    from mllm_cl.model_folder import ModelFolderError
    from mllm_cl.weights import CheckpointMismatchError, load_llm, save_llm

    folder = save_llm(LanguageModel(LLMConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=8, d_ff=16)),
                      tmp_path / "llm")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(["x"] if change == "a list" else {**config, **change}))
    with pytest.raises((CheckpointMismatchError, ModelFolderError), match=named) as error:
        load_llm(folder)
    assert "config.json" in str(error.value)


def test_select_layer_outside_the_tower_is_named() -> None:
    from mllm_cl.config import vision_preset

    with pytest.raises(ConfigError, match="select_layer=99 is out of range for a tower with 4 layers"):
        vision_preset("clip-tiny", select_layer=99)


def test_eval_refuses_max_new_tokens_below_one(capsys) -> None:
    with pytest.raises(SystemExit):
        eval_cli.main(["somewhere", "--suite", "vl", "--max-new-tokens", "0"])
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err


def test_resuming_with_another_train_file_is_refused(world: Path, tmp_path: Path) -> None:
    run_stage(text_stage(world, tmp_path / "run"))
    other = tmp_path / "other.txt"
    other.write_text((world / "text/train.txt").read_text()[::-1])
    changed = text_stage(world, tmp_path / "run", resume=True)
    changed.train_file = str(other)
    with pytest.raises(StageError, match=r"other settings .*'train_file'"):
        run_stage(changed)


# ---------------------------------------------------------------- a continual run's scores (issue 30)

def continual_stage(tmp_path: Path, **fields: object) -> StageConfig:
    fields = {"train": TrainConfig(device="cpu"), "tasks": [TaskSpec(name="t", train="a.json", test="b.json")],
              **fields}
    return StageConfig(stage="continual", init=str(tmp_path / "old"), out_dir=str(tmp_path / "out"), **fields)


def test_initial_eval_over_the_starting_model_is_refused(tmp_path: Path) -> None:
    tiny_pair(tmp_path)
    before = digest(tmp_path / "old")
    with pytest.raises(StageError, match=r"initial_eval .*old/config.json would write inside init .*old"):
        run_stage(continual_stage(tmp_path, initial_eval=str(tmp_path / "old" / "config.json")))
    assert digest(tmp_path / "old") == before
    assert not (tmp_path / "out").exists()


def test_a_finished_experiments_scores_are_not_replaced_by_a_continual_run(tmp_path: Path) -> None:
    tiny_pair(tmp_path)
    experiment = tmp_path / "out"  # what run_experiment leaves at its top: no continual stage's settings
    experiment.mkdir()
    (experiment / "results.json").write_text('{"methods": {"naive": {}}}\n')
    (experiment / "initial_eval.json").write_text('{"nl": {}}\n')
    before = digest(experiment)
    for resume in (False, True):
        with pytest.raises(StageError, match="holds (results|initial_eval).json from something other than a run"):
            run_stage(continual_stage(tmp_path, train=TrainConfig(device="cpu", resume=resume)))
        assert digest(experiment) == before


@pytest.mark.parametrize("target", ["benchmark", "results", "task eval"])
def test_eval_json_over_a_benchmark_or_another_runs_file_is_refused(tmp_path: Path, capsys, target: str) -> None:
    nl = tmp_path / "nl"
    nl.mkdir()
    (nl / "facts.jsonl").write_text('{"id": "0", "kind": "last_word", "context": "a", "target": " b"}\n')
    run = tmp_path / "run"
    (run / "task_1_color").mkdir(parents=True)
    (run / "results.json").write_text('{"methods": ["naive"], "after_task": []}\n')
    (run / "task_1_color" / "eval.json").write_text('{"nl": {"facts": {"acc": 1.0, "n": 1}}, "vl": {}}\n')
    path = {"benchmark": nl / "facts.jsonl", "results": run / "results.json",
            "task eval": run / "task_1_color" / "eval.json"}[target]
    before = digest(tmp_path)
    code = eval_cli.main([str(tmp_path / "no_model_here"), "--suite", "nl", "--nl-dir", str(nl), "--json", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("eval.py: error: --json ")
    assert ("would write inside --nl-dir" if target == "benchmark" else
            "exists and is not a scores file eval.py wrote") in err
    assert digest(tmp_path) == before


def test_eval_json_may_replace_its_own_scores(tmp_path: Path, capsys) -> None:
    scores = tmp_path / "scores.json"
    scores.write_text('{"facts": {"acc": 0.5, "n": 2}}\n')
    assert eval_cli.is_scores_file(json.loads(scores.read_text())) and not eval_cli.is_scores_file([1])
    assert eval_cli.main([str(tmp_path / "no_model_here"), "--suite", "nl", "--json", str(scores)]) == 2
    err = capsys.readouterr().err
    assert "no_model_here" in err and "--json" not in err  # past the check: the missing model is what stops it


@pytest.mark.parametrize("target", ["NL file", "general test", "task image", "another run's results"])
def test_initial_eval_over_a_benchmark_an_image_or_another_runs_results_is_refused(tmp_path: Path,
                                                                                   target: str) -> None:
    images, other = tmp_path / "images", tmp_path / "other"
    images.mkdir()
    other.mkdir()
    files = {"NL file": tmp_path / "facts.jsonl", "general test": tmp_path / "general.json",
             "task image": images / "000000.png", "another run's results": other / "results.json"}
    for path in files.values():
        path.write_bytes(b'{"methods": {}}\n')
    fields = dict(tasks=[TaskSpec(name="t", train="a.json", test="b.json", image_folder=str(images))],
                  eval=EvalSpec(nl_files=[str(files["NL file"])],
                                general_vl=[TaskSpec(name="general", train="", test=str(files["general test"]))]))
    before = digest(tmp_path)
    message = {"NL file": "would write over the NL file", "general test": "would write over general's test file",
               "task image": "would write inside t's image folder",
               "another run's results": "exists and is not a cache of initial scores"}[target]
    with pytest.raises(StageError, match=message):
        run_stage(continual_stage(tmp_path, initial_eval=str(files[target]), **fields))
    assert digest(tmp_path) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- JSON files of every kind of wrong (issue 30)

BAD_JSON = {"not UTF-8": (b"\xff\xfe{}", "is not UTF-8 text (byte 0: invalid start byte)"),
            "nested": (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply to be read"),
            "not JSON": (b"{'a': 1}", "is not valid JSON")}


@pytest.mark.parametrize("bad", sorted(BAD_JSON))
def test_a_bad_config_file_is_one_line(tmp_path: Path, capsys, bad: str) -> None:
    content, message = BAD_JSON[bad]
    (tmp_path / "config.json").write_bytes(content)
    assert train.main(["finetune", "--config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"train.py finetune: error: {tmp_path / 'config.json'} {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1


@pytest.mark.parametrize("index, message", [
    (b"[]", "must hold a JSON object, not a list"),
    (b'{"weight_map": []}', 'is not a checkpoint index: it needs "weight_map", an object from tensor names'),
    (b'{"weight_map": {}}', 'is not a checkpoint index: it needs "weight_map"'),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_a_bad_safetensors_index_is_one_error_naming_it(tmp_path: Path, index: bytes, message: str) -> None:
    import re

    from mllm_cl.config import LLMConfig
    from mllm_cl.llm import LanguageModel
    from mllm_cl.model_folder import ModelFolderError
    from mllm_cl.weights import load_llm, save_llm

    folder = save_llm(LanguageModel(LLMConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=8, d_ff=16)),
                      tmp_path / "llm")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(ModelFolderError, match=re.escape(f"{folder / 'model.safetensors.index.json'} {message}")):
        load_llm(folder)


def test_a_tokenizer_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    from test_tokenizer import byte_tokenizer_folder

    from mllm_cl.tokenizer import TokenizerError, load_tokenizer

    folder = byte_tokenizer_folder(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json is not UTF-8 text \(byte 0"):
        load_tokenizer(folder)


def test_resuming_on_training_data_changed_since_is_refused(world: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "train.txt"
    lines = (world / "text/train.txt").read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines))

    def on_corpus(**train: object) -> StageConfig:
        return replace(text_stage(world, tmp_path / "run", **train), train_file=str(corpus))

    run_stage(on_corpus(steps=2, save_every=1))
    (tmp_path / "run" / "model").rename(tmp_path / "run" / "kept")  # as if killed after the first checkpoint
    before = digest(tmp_path / "run")
    corpus.write_text("".join(reversed(lines)))  # the same lines, another order: another run
    config = tmp_path / "resume.json"  # the refusal as a user meets it: train.py in a process of its own
    config.write_text(json.dumps(to_dict(on_corpus(steps=2, save_every=1, resume=True))))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "pretrain-text", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert re.match(rf"train.py pretrain-text: error: the training data changed since the run in .*run began: "
                    rf"{corpus} \(sha256 differs\); resuming would continue on other data", done.stderr)
    assert digest(tmp_path / "run") == before
    corpus.write_text("".join(lines))  # restored: the run continues
    run_stage(on_corpus(steps=2, save_every=1, resume=True))
    assert (tmp_path / "run" / "model").is_dir()
