"""Paper 2's continual pretraining: the general mix split into its parts by id, and a part's score read from the
general evaluation (NL omega for the text part, the skill's general-VL test for the others)."""

import json
from pathlib import Path

import pytest

from mllm_cl.config import StageError
from mllm_cl.continual_pretraining import LANGUAGE, skill_score, split_mix


def record(part: str, index: int, image: bool) -> dict:
    return {"id": f"general-{part}-{index:05d}", **({"image": "x.png"} if image else {}),
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}


def test_the_mix_splits_into_the_text_part_first_then_each_skill(tmp_path: Path) -> None:
    mix = [record("pair", 0, True), record("text", 0, False), record("describe", 0, True),
           record("document", 0, False), record("describe", 1, True)]
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    tasks = split_mix(tmp_path / "mix.json", ["describe", "pair"], "images", tmp_path / "parts")
    assert [t.name for t in tasks] == [LANGUAGE, "describe", "pair"]
    parts = {t.name: [r["id"] for r in json.loads(Path(t.train).read_text())] for t in tasks}
    assert parts == {LANGUAGE: ["general-text-00000", "general-document-00000"],
                     "describe": ["general-describe-00000", "general-describe-00001"], "pair": ["general-pair-00000"]}
    assert all(t.test == "" and t.image_folder == "images" for t in tasks)  # scored by the general evaluation


def test_a_mix_of_another_origin_or_a_missing_part_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "mix.json").write_text(json.dumps([record("describe", 0, True), {"id": "coco-17"}]))
    with pytest.raises(StageError, match="record 1 has id 'coco-17', not general-<part>-<n>"):
        split_mix(tmp_path / "mix.json", ["describe"], "", tmp_path / "parts")
    (tmp_path / "mix.json").write_text(json.dumps([record("describe", 0, True), record("text", 0, False)]))
    with pytest.raises(StageError, match=r"no records of the part\(s\) \['pair'\]"):
        split_mix(tmp_path / "mix.json", ["describe", "pair"], "", tmp_path / "parts")


def test_a_part_is_scored_by_the_sub_skill_it_teaches() -> None:
    scores = {"nl": {"facts": {"acc": 0.8}, "last_word": {"acc": 0.4}},
              "general_vl": {"general_describe": {"acc": 0.25, "n": 100}}}
    assert skill_score(scores, LANGUAGE) == pytest.approx(2 / (1 / 80 + 1 / 40))  # NL omega: the harmonic mean
    assert skill_score(scores, "describe") == 25.0
    with pytest.raises(StageError, match="no general-VL test 'general_pair'"):
        skill_score(scores, "pair")
