"""NL evaluation speed and agreement: our batched evaluator against a plain Hugging Face reference.

Ours: `mllm_cl.weights.load_llm` + `mllm_cl.tokenizer` + the batched, prefix-sharing scorer of
`mllm_cl.evaluation_nl`. The reference (`--reference transformers`) shares none of that code: the same
folder loaded by `AutoModelForCausalLM`, tokenized by `transformers`' own fast tokenizer with lm-eval's
rules (no BOS; trailing context spaces move to the continuation; BOS, else EOS, for an empty context),
one request per forward, no padding. Prints both accuracies side by side, the largest per-request
log-likelihood gap, and examples/s; never asserts.

    python bench/eval_speed.py data/offline/smollm2-135m --nl-dir data/offline/nl --limit 200 --reference transformers
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_cl.evaluation import NL_DIRS, NL_PATTERN, find_tasks  # noqa: E402
from mllm_cl.evaluation_nl import (LastWordDoc, NLDoc, encode_request, evaluate_nl_documents,  # noqa: E402
                                   read_nl_documents, score_loglikelihood)
from mllm_cl.tokenizer import load_tokenizer  # noqa: E402
from mllm_cl.weights import load_llm  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def requests_of(docs: list[NLDoc]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for doc in docs:
        out += [(doc.context, doc.target)] if isinstance(doc, LastWordDoc) else doc.requests
    return out


def metrics_from(docs: list[NLDoc], scores: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's aggregation, written out again (independent of evaluate_nl_documents)."""
    if isinstance(docs[0], LastWordDoc):
        return {"acc": sum(g for _, g in scores) / len(docs),
                "perplexity": math.exp(-sum(ll for ll, _ in scores) / len(docs)), "n": len(docs)}
    acc = acc_norm = offset = 0
    for doc in docs:
        lls = [ll for ll, _ in scores[offset:offset + len(doc.requests)]]
        norm = [ll / len(cont.encode("utf-8")) for ll, (_, cont) in zip(lls, doc.requests)]
        acc += lls.index(max(lls)) == doc.gold
        acc_norm += norm.index(max(norm)) == doc.gold
        offset += len(doc.requests)
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs), "n": len(docs)}


class TransformersReference:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.max_len = self.model.config.max_position_embeddings
        self.device = device

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if not context:
            prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            return [prefix], tok(continuation, add_special_tokens=False).input_ids
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        n = len(tok(context, add_special_tokens=False).input_ids)
        return whole[:n], whole[n:]

    @torch.inference_mode()
    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        context_ids, continuation_ids = self.encode(context, continuation)
        window = (context_ids + continuation_ids)[-(self.max_len + 1):][:-1]
        logits = self.model(torch.tensor([window], device=self.device)).logits[0, -len(continuation_ids):]
        log_probs = logits.float().log_softmax(-1)
        targets = torch.tensor(continuation_ids, device=self.device)
        return log_probs.gather(-1, targets[:, None]).sum().item(), bool((log_probs.argmax(-1) == targets).all())


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a Hugging Face-layout LLM folder with tokenizer.json")
    parser.add_argument("--tasks", help="comma-separated task names (default: every NL task file found)")
    parser.add_argument("--nl-dir", type=Path)
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--reference", choices=("none", "transformers"), default="none")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    model = load_llm(args.model_dir, device, dtype).eval()
    tokenizer = load_tokenizer(args.model_dir)
    reference = TransformersReference(args.model_dir, device, dtype) if args.reference == "transformers" else None
    names = args.tasks.split(",") if args.tasks else None
    tasks = find_tasks([args.nl_dir] if args.nl_dir else list(NL_DIRS), NL_PATTERN, names)
    print(f"{args.model_dir} on {device} in {args.dtype}, batch {args.batch_size}, max_seq_len "
          f"{model.config.max_seq_len}")
    header = f"{'task':<16} {'n':>5} {'acc':>7} {'acc_norm':>8} {'ppl':>10} {'ex/s':>8}"
    print(header + (f" | {'ref acc':>7} {'ref norm':>8} {'ref ppl':>10} {'ref ex/s':>8} {'max|dLL|':>9}"
                    if reference else ""))
    for task, path in tasks.items():
        docs = read_nl_documents(path, args.limit)
        evaluate_nl_documents(model, tokenizer, docs[:2], max_seq_len=model.config.max_seq_len)  # warm-up
        ours, seconds = timed(lambda: evaluate_nl_documents(model, tokenizer, docs, batch_size=args.batch_size,
                                                            max_seq_len=model.config.max_seq_len), device)
        line = (f"{task:<16} {ours['n']:>5} {ours['acc']:>7.4f} {ours.get('acc_norm', float('nan')):>8.4f} "
                f"{ours.get('perplexity', float('nan')):>10.3f} {len(docs) / seconds:>8.1f}")
        if reference is not None:
            requests = requests_of(docs)
            ref_scores, ref_seconds = timed(lambda: [reference.score(c, x) for c, x in requests], device)
            ref = metrics_from(docs, ref_scores)
            encoded = [encode_request(tokenizer, c, x) for c, x in requests]
            our_scores = score_loglikelihood(model, encoded, max_seq_len=model.config.max_seq_len,
                                             batch_size=args.batch_size, pad_id=tokenizer.eos_id)
            gap = max(abs(a[0] - b[0]) for a, b in zip(our_scores, ref_scores))
            same_ids = sum(encoded[i] == reference.encode(*requests[i]) for i in range(len(requests)))
            line += (f" | {ref['acc']:>7.4f} {ref.get('acc_norm', float('nan')):>8.4f} "
                     f"{ref.get('perplexity', float('nan')):>10.3f} {len(docs) / ref_seconds:>8.1f} {gap:>9.2e}")
            if same_ids != len(requests):
                line += f"  (token ids differ in {len(requests) - same_ids}/{len(requests)} requests)"
        print(line)


if __name__ == "__main__":
    main()
