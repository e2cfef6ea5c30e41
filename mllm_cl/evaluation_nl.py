"""Language (NL) evaluation by log-likelihood, zero-shot, as EleutherAI's lm-evaluation-harness does it.

Paper 1 (Srivastava et al., 2024) measures forgetting of language skill this way: multiple choice
(WSC273, WinoGrande, ARC) by the summed log-likelihood of each choice, and LAMBADA by whether the
target word is the greedy continuation. The conventions below follow lm-eval v0.4 (`HFLM`):

* A request is (context, continuation). Trailing spaces of the context move to the continuation;
  the ids are `encode(context)` and `encode(context + continuation)[len(encode(context)):]`, so the
  continuation is tokenized as it appears after its context. No BOS is added (lm-eval adds none for
  Pythia, whose tokenizer has no BOS post-processor); an empty context becomes one prefix token, the
  tokenizer's BOS id or else its EOS id.
* The model sees `(context + continuation)[-(max_seq_len + 1):][:-1]` (truncated from the left).
* `acc` = argmax of summed log-likelihood == gold (first maximum wins). `acc_norm` divides each
  log-likelihood by the continuation's length in UTF-8 bytes (lm-eval divides by the characters of
  the choice without its leading space; bytes are the tokenizer-free measure OLMo's evals use).
* Last word: `acc` = every target token is the argmax given what precedes it (= greedy decoding
  reproduces the target); `perplexity` = exp(-sum of target log-likelihoods / number of documents),
  lm-eval's LAMBADA definition (per document, not per token).

Under torchrun every rank computes its share of the batches and the scores are gathered (`mllm_cl.sharding`):
every rank ends with exactly the numbers one process gives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mllm_cl.errors import UserError
from mllm_cl.sharding import gather_results, my_batches
from mllm_cl.tokenizer import lone_surrogate


class EvalDataError(UserError, ValueError):
    """A benchmark file or entry that cannot be evaluated; the message names the file and line or entry."""


class TextEncoder(Protocol):
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


@dataclass
class MultipleChoiceDoc:
    id: str
    requests: list[tuple[str, str]]  # one (context, continuation) per choice
    gold: int


@dataclass
class LastWordDoc:
    id: str
    context: str
    target: str  # with its leading space


NLDoc = MultipleChoiceDoc | LastWordDoc


# ---------------------------------------------------------------- request files (JSONL, docs/CONTRACTS.md)

def _check(condition: bool, path: Path, line: int, message: str) -> None:
    if not condition:
        raise EvalDataError(f"{path}, line {line}: {message}")


def _parse_doc(data: Any, path: Path, line: int) -> NLDoc:
    _check(isinstance(data, dict), path, line, f"expected a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    _check(kind in ("multiple_choice", "last_word"), path, line,
           f"'kind' must be 'multiple_choice' or 'last_word', got {kind!r}")
    keys = {"id", "kind", "requests", "gold"} if kind == "multiple_choice" else {"id", "kind", "context", "target"}
    missing = sorted(keys - set(data))
    _check(not missing, path, line, f"missing key(s) {missing} for a {kind} document (needs {sorted(keys)})")
    _check(isinstance(data["id"], str), path, line, f"'id' must be a string, got {type(data['id']).__name__}")
    texts = [data.get("context"), data.get("target")] + [s for pair in data.get("requests") or []
                                                         if isinstance(pair, list) for s in pair]
    for text in texts:
        surrogate = lone_surrogate(text) if isinstance(text, str) else None
        _check(surrogate is None, path, line, f"its text holds {surrogate}, which is not Unicode text")
    if kind == "last_word":
        for key in ("context", "target"):
            _check(isinstance(data[key], str), path, line, f"{key!r} must be a string")
        _check(data["target"].strip() != "", path, line, "'target' is empty")
        return LastWordDoc(data["id"], data["context"], data["target"])
    requests = data["requests"]
    _check(isinstance(requests, list) and len(requests) >= 2, path, line,
           "'requests' must be a list of at least two [context, continuation] pairs")
    for i, pair in enumerate(requests):
        _check(isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair), path, line,
               f"requests[{i}] must be a [context, continuation] pair of strings, got {pair!r}")
        _check(pair[1] != "", path, line, f"requests[{i}] has an empty continuation")
    gold = data["gold"]
    _check(isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(requests), path, line,
           f"'gold' must be an integer in [0, {len(requests) - 1}], got {gold!r}")
    return MultipleChoiceDoc(data["id"], [(c, x) for c, x in requests], gold)


def read_nl_documents(path: str | Path, limit: int | None = None) -> list[NLDoc]:
    """Every document of a JSONL benchmark file (the first `limit` if given); one kind per file."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"NL benchmark file {path} does not exist")
    docs: list[NLDoc] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"NL benchmark file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    for line_no, text in enumerate(lines, start=1):
        if limit is not None and len(docs) >= limit:
            break
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise EvalDataError(f"{path}, line {line_no}: not valid JSON ({e})") from None
        doc = _parse_doc(data, path, line_no)
        _check(doc.id not in seen, path, line_no, f"id {doc.id!r} already used on line {seen.get(doc.id)}")
        _check(not docs or type(doc) is type(docs[0]), path, line_no,
               "documents of different kinds in one file; keep one task (one kind) per file")
        seen[doc.id] = line_no
        docs.append(doc)
    if not docs:
        raise EvalDataError(f"NL benchmark file {path} holds no documents")
    return docs


# ---------------------------------------------------------------- tokenization

def encode_request(tokenizer: TextEncoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), lm-eval style (see the module docstring)."""
    if context == "":
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise EvalDataError("a request has an empty context and the tokenizer has neither BOS nor EOS id")
        return [prefix], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return context_ids, whole[len(context_ids):]


# ---------------------------------------------------------------- batched log-likelihood

def _hosts(inputs: list[tuple[int, ...]], shareable: list[bool]) -> list[int]:
    """For each input, the index of an input that contains it as a prefix (itself if none).

    A causal model's logits at position t depend only on tokens 0..t, so one forward over the longer
    sequence scores both. Sorted lexicographically, every sequence that extends `a` follows `a`
    directly, so one backward pass over the sorted order finds the longest extension of each.
    """
    host = list(range(len(inputs)))
    order = sorted((i for i in range(len(inputs)) if shareable[i]), key=lambda i: inputs[i])
    for a, b in zip(reversed(order[:-1]), reversed(order[1:])):
        if inputs[b][:len(inputs[a])] == inputs[a]:
            host[a] = host[b]
    return host


@torch.inference_mode()
def score_loglikelihood(model: torch.nn.Module, requests: list[tuple[list[int], list[int]]], *,
                        max_seq_len: int, batch_size: int = 16, pad_id: int = 0) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per request.

    `model(input_ids=..., attention_mask=...)` must return an object with `.logits` (B, T, V): our
    `LanguageModel` or a Hugging Face causal LM. Requests whose model input is a prefix of another's
    share its forward; the rest are sorted by length (longest first, as lm-eval) and right-padded. Under
    torchrun each rank runs its share of the batches; every rank returns all the scores.
    """
    device = next(model.parameters()).device
    windows, cont_lens, shareable = [], [], []
    for i, (context_ids, continuation_ids) in enumerate(requests):
        whole = context_ids + continuation_ids
        window = whole[-(max_seq_len + 1):][:-1]
        if not continuation_ids or len(continuation_ids) > len(window):
            raise EvalDataError(f"request {i}: continuation of {len(continuation_ids)} tokens does not fit a "
                                f"model input of {len(window)} tokens (max_seq_len={max_seq_len}): shorten the "
                                f"answer or use a model with a longer context")
        windows.append(tuple(window))
        cont_lens.append(len(continuation_ids))
        shareable.append(len(whole) - 1 <= max_seq_len)
    host = _hosts(windows, shareable)
    by_host: dict[int, list[int]] = {}
    for i, h in enumerate(host):
        by_host.setdefault(h, []).append(i)
    forwards = sorted(by_host, key=lambda h: (-len(windows[h]), windows[h]))

    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    mine: list[int] = []
    for batch in my_batches(forwards, batch_size):
        width = len(windows[batch[0]])
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, h in enumerate(batch):
            input_ids[row, :len(windows[h])] = torch.tensor(windows[h])
            attention_mask[row, :len(windows[h])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # (B,T,V)
        scored, lengths, rows, positions, targets = [], [], [], [], []
        for row, h in enumerate(batch):
            for i in by_host[h]:
                end, n = len(windows[i]), cont_lens[i]
                scored.append(i)
                lengths.append(n)
                rows += [row] * n
                positions += range(end - n, end)  # position t predicts token t + 1
                targets += requests[i][1]
        logliks, greedy = _continuation_scores(logits, rows, positions, targets, lengths)
        for i, loglik, is_greedy in zip(scored, logliks, greedy):
            results[i] = (loglik, is_greedy)
        mine += scored
    return gather_results(results, mine)


def _continuation_scores(logits: torch.Tensor, rows: list[int], positions: list[int], targets: list[int],
                         lengths: list[int]) -> tuple[list[float], list[bool]]:
    """Every continuation token of a batch in one gather; summed per request (`lengths` tokens each)."""
    device = logits.device
    log_probs = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # (N, V)
    log_probs = log_probs.float().log_softmax(-1)
    target = torch.tensor(targets, device=device)  # (N,)
    token_ll = log_probs.gather(-1, target[:, None]).squeeze(-1)  # (N,)
    missed = (log_probs.argmax(-1) != target).long()  # (N,)
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    loglik = torch.zeros(len(lengths), device=device).index_add_(0, owner, token_ll)  # (R,)
    misses = torch.zeros(len(lengths), dtype=torch.long, device=device).index_add_(0, owner, missed)  # (R,)
    return loglik.tolist(), (misses == 0).tolist()  # one device-to-host copy per batch


# ---------------------------------------------------------------- task metrics

def evaluate_nl_documents(model: torch.nn.Module, tokenizer: TextEncoder, docs: list[NLDoc], *,
                          max_seq_len: int, batch_size: int = 16) -> dict[str, float]:
    """Metrics of one task: {"acc", "acc_norm", "n"} for multiple choice, {"acc", "perplexity", "n"} for last word."""
    return score_nl_documents(model, tokenizer, docs, max_seq_len=max_seq_len, batch_size=batch_size)[0]


def score_nl_documents(model: torch.nn.Module, tokenizer: TextEncoder, docs: list[NLDoc], *,
                       max_seq_len: int, batch_size: int = 16) -> tuple[dict[str, float], list[int]]:
    """(`evaluate_nl_documents`' metrics, 1/0 per document: whether it was answered correctly), the latter for
    intervals that resample documents (`metrics.bootstrap_delta_interval`)."""
    requests: list[tuple[str, str]] = []
    for doc in docs:
        requests += doc.requests if isinstance(doc, MultipleChoiceDoc) else [(doc.context, doc.target)]
    encoded = [encode_request(tokenizer, context, continuation) for context, continuation in requests]
    scores = score_loglikelihood(model, encoded, max_seq_len=max_seq_len, batch_size=batch_size,
                                 pad_id=tokenizer.eos_id or 0)
    if isinstance(docs[0], LastWordDoc):
        mean_nll = -sum(loglik for loglik, _ in scores) / len(docs)
        outcomes = [int(greedy) for _, greedy in scores]
        return ({"acc": sum(outcomes) / len(docs), "perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf,
                 "n": len(docs)}, outcomes)
    outcomes, correct_norm = [], 0
    offset = 0
    for doc in docs:
        logliks = [loglik for loglik, _ in scores[offset:offset + len(doc.requests)]]
        normed = [ll / len(cont.encode("utf-8")) for ll, (_, cont) in zip(logliks, doc.requests)]
        outcomes.append(int(_first_argmax(logliks) == doc.gold))
        correct_norm += _first_argmax(normed) == doc.gold
        offset += len(doc.requests)
    return {"acc": sum(outcomes) / len(docs), "acc_norm": correct_norm / len(docs), "n": len(docs)}, outcomes


def _first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
