"""Evaluation under torchrun: two gloo processes share out the batches, and each ends with exactly the scores and
answers one process gives."""

import datetime
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mllm_cl.config import LLMConfig, VisionConfig
from mllm_cl.evaluation_nl import encode_request, read_nl_documents, score_loglikelihood, score_nl_documents
from mllm_cl.evaluation_vl import VLEvalCache, evaluate_vl_examples, generate_answers, read_vl_test_set
from mllm_cl.llava import LlavaModel
from mllm_cl.llm import LanguageModel
from mllm_cl.projector import build_projector
from mllm_cl.synthetic import build_world
from mllm_cl.tokenizer import load_tokenizer
from mllm_cl.vision import VisionTower

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

RANKS = 2
# (file, batch size): 7 and 5 batches (rank 0 runs one more than rank 1), and one batch (rank 1 runs none)
NL_CASES = [("facts_mc", 6), ("last_word", 8), ("last_word", 64)]
NL_BATCHES = [7, 5, 1]
VL_CASES = [4, 16]  # batch sizes for the 10 test examples: 3 batches, 1 batch
VL_BATCHES = [3, 1]


def build_model(vocab_size: int) -> LlavaModel:
    vision = VisionTower(VisionConfig(image_size=16, patch_size=8, d_model=32, n_layer=2, n_head=2, d_ff=64))
    llm = LanguageModel(LLMConfig(vocab_size=-(-vocab_size // 64) * 64, n_layer=2, n_head=2, n_kv_head=2,
                                  d_model=32, d_ff=64, rotary_pct=0.25, max_seq_len=256, pad_token_id=1,
                                  init_std=0.5))  # large init: distinct predictions
    return LlavaModel(vision, build_projector("mlp2x_gelu", 32, 32), llm).eval()


def evaluate_all(world: Path) -> dict:
    """Every case's scores and answers with the saved weights, and how many batches this process ran."""
    tokenizer = load_tokenizer(world / "tokenizer.json")
    model = build_model(tokenizer.vocab_size)
    model.load_state_dict(torch.load(world.parent / "model.pt"))
    forwards: list[str] = []
    model.llm.register_forward_hook(lambda *_: forwards.append("llm"))
    model.vision.register_forward_hook(lambda *_: forwards.append("vision"))
    results: dict = {}
    for name, batch_size in NL_CASES:
        docs = read_nl_documents(world / f"nl/{name}.jsonl")
        forwards.clear()
        metrics, correct = score_nl_documents(model.llm, tokenizer, docs, max_seq_len=256, batch_size=batch_size)
        batches = forwards.count("llm")
        requests = [encode_request(tokenizer, context, continuation) for doc in docs
                    for context, continuation in (doc.requests if name == "facts_mc" else [(doc.context, doc.target)])]
        scores = score_loglikelihood(model.llm, requests, max_seq_len=256, batch_size=batch_size,
                                     pad_id=tokenizer.eos_id)
        results[name, batch_size] = {"metrics": metrics, "correct": correct, "scores": scores, "batches": batches}
    examples = read_vl_test_set(world / "tasks/choice/test.json", world) + \
        read_vl_test_set(world / "tasks/color/test.json", world)
    for batch_size in VL_CASES:
        cache = VLEvalCache()
        options = dict(template="pythia", batch_size=batch_size, max_new_tokens=4)
        forwards.clear()
        answers = generate_answers(model, tokenizer, examples, cache=cache, **options)
        encoded = forwards.count("vision")  # one encoding per batch this process ran
        forwards.clear()
        metrics = evaluate_vl_examples(model, tokenizer, examples, cache=cache, **options)
        encoded_again = forwards.count("vision")
        plain = generate_answers(model, tokenizer, examples, **options)  # no cache
        results["vl", batch_size] = {"answers": answers, "plain": plain, "metrics": metrics, "batches": encoded,
                                     "encoded_again": encoded_again}
    return results


def run_rank(rank: int, world: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=datetime.timedelta(seconds=60))
    try:
        results = evaluate_all(world)
        (world.parent / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic world (40 docs per NL file, 5 test examples per task) and a random model's weights."""
    folder = tmp_path_factory.mktemp("distributed_eval") / "world"
    build_world(folder, seed=0, size="smoke", image_size=16, train_per_task=1, test_per_task=5)
    torch.manual_seed(0)
    torch.save(build_model(load_tokenizer(folder / "tokenizer.json").vocab_size).state_dict(),
               folder.parent / "model.pt")
    return folder


def test_every_rank_ends_with_the_one_process_scores(world: Path) -> None:
    alone = evaluate_all(world)
    for case, batches in zip([*NL_CASES, *(("vl", b) for b in VL_CASES)], NL_BATCHES + VL_BATCHES):
        assert alone[case]["batches"] == batches, case

    mp.spawn(run_rank, args=(world, free_port()), nprocs=RANKS, join=True)

    for rank in range(RANKS):
        shared = pickle.loads((world.parent / f"rank{rank}.pkl").read_bytes())
        assert shared.keys() == alone.keys()
        for case, expected in alone.items():
            got = shared[case]
            assert got["batches"] == len(range(rank, expected["batches"], RANKS)), (rank, case)  # its share only
            if case[0] == "vl":
                assert got["answers"] == got["plain"] == expected["answers"], (rank, case)
                assert got["metrics"] == expected["metrics"], (rank, case)
                assert got["encoded_again"] == 0, (rank, case)  # the cache holds every image this rank saw
            else:
                for key in ("scores", "metrics", "correct"):
                    assert got[key] == expected[key], (rank, case, key)  # identical, not approximately equal
