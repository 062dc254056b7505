"""Open-domain QA evaluation: exact match of generated answers and top-k retrieval accuracy.

Questions are split across data-parallel ranks (each question evaluated once), every rank
runs the same number of (collective) index searches, and the per-question results are
gathered so that every rank returns the same metrics. Predictions go to a JSON-lines file
with the retrieved passages and their retrieval probabilities (the paper's Table 10).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron.emdr2.data.answers import exact_match
from megatron.emdr2.data.inputs import encode_context
from megatron.emdr2.openqa import reader_modes
from megatron.emdr2.openqa.retrieval import first_hit_ranks, top_k_accuracy

RETRIEVAL_KS = (1, 5, 20)  # the default of --eval-top-k-list (OpenQAConfig.eval_top_k)

logger = logging.getLogger(__name__)


def _dp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    # Into a log file a redrawn bar is only noise (the metrics line follows it), as for embedding.
    return tqdm(total=total, desc=desc, unit="q", disable=not enabled or not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False)


@torch.no_grad()
def predict_batch(task, models, examples: Sequence, k_search: int, passages_in_output: int = 5) -> list[dict]:
    """Retrieve, read and answer a batch of questions (answers, if any, are only carried along).

    Each record: question, prediction, the retrieval ranks' passages (id, title, p(z|q) from the
    current towers, over the reader's top-K), and the first-hit rank when gold answers exist.
    """
    biencoder, reader = models["biencoder"], models["reader"]
    qa = task.qa
    batch = task._qa_batch(examples, [e.answers[0] if e.answers else "" for e in examples])
    r_dev, b_dev = next(reader.parameters()).device, next(biencoder.parameters()).device
    _, ids, _ = task.retrieve(biencoder, batch, k_search)
    passages = task.passages(ids)
    K = min(qa.top_k, ids.size(1))
    reader_passages = [ps[:K] for ps in passages]
    r_ids, r_mask = (t.to(r_dev) for t in task.reader_inputs(batch.questions, reader_passages))
    q_emb = biencoder.embed_queries(batch.query_ids.to(b_dev), batch.query_mask.to(b_dev))
    c_ids, c_mask = encode_context(task.rtok, [p for ps in reader_passages for p in ps],
                                   qa.context_max_len, pad_to="longest")
    c_emb = biencoder.embed_contexts(c_ids.to(b_dev), c_mask.to(b_dev)).view(len(examples), K, -1)
    log_p_z = torch.log_softmax(biencoder.score(q_emb, c_emb), dim=-1)
    probs = log_p_z.exp()
    # Decoded as the reader was trained to read (--reader-mode; reader_modes.generate_answers).
    generated = reader_modes.generate_answers(qa, task.tok, reader, r_ids, r_mask, log_p_z.to(r_dev))
    has_gold = all(e.answers for e in examples)
    ranks = first_hit_ranks(batch.answers, passages) if has_gold else np.zeros(len(examples), np.int64)
    records = []
    for j in range(len(examples)):
        n = min(passages_in_output, K)
        records.append({
            "question": batch.questions[j],
            "answers": batch.answers[j],
            "prediction": task.tok.decode(generated[j].tolist()),
            "first_hit_rank": int(ranks[j]),
            "passages": [{"id": int(pid), "title": t, "text": x, "probability": round(float(p), 5)}
                         for pid, (t, x), p in zip(ids[j, :n].tolist(), reader_passages[j][:n],
                                                   probs[j, :n].tolist())],
        })
    return records


@torch.no_grad()
def evaluate_open_qa(task, models, examples: Sequence, iteration: int = 0,
                     predictions_file: Optional[str] = None, passages_in_output: int = 5,
                     ks: Optional[Sequence[int]] = None) -> dict:
    """EM and top-k retrieval accuracy of the task's retriever + reader on ``examples``;
    ``ks``: the top-k accuracies reported (default: the task's ``eval_top_k``)."""
    ks = tuple(ks or getattr(task.qa, "eval_top_k", RETRIEVAL_KS))
    rank, world, group = _dp()
    mine = list(range(rank, len(examples), world))
    bs = task.qa.eval_batch_size
    steps = math.ceil(math.ceil(len(examples) / world) / bs) if examples else 0
    k_search = max(task.qa.top_k, max(ks))
    records = []
    first = not dist.is_initialized() or dist.get_rank() == 0
    bar = _progress(len(mine), first, "evaluate")
    for s in range(steps):
        idx = mine[s * bs:(s + 1) * bs]
        if not idx:  # keep the collective index search in step with the other ranks
            hidden = models["biencoder"].query_tower.hidden_size
            task.index_manager.index.search(torch.zeros(0, hidden), k_search)
            continue
        for i, rec in zip(idx, predict_batch(task, models, [examples[i] for i in idx], k_search,
                                             passages_in_output)):
            rec["index"] = i
            rec["em"] = bool(exact_match(rec["prediction"], rec["answers"]))
            records.append(rec)
        bar.update(len(idx))
    bar.close()

    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, records, group=group)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: r["index"])
    ranks = np.array([r["first_hit_rank"] for r in records])
    metrics = {"em": float(np.mean([r["em"] for r in records])) if records else 0.0,
               **top_k_accuracy(ranks, ks), "questions": len(records),
               **reading_accuracy(records, task.qa.top_k)}
    if predictions_file and first:
        write_predictions(predictions_file, records, iteration)
    return metrics


def reading_accuracy(records: Sequence[dict], top_k: int) -> dict:
    """EM on the questions whose answer string occurs in one of the K passages the reader read:
    how well the reader reads, apart from how well the retriever retrieves. Also how many such
    questions there were ("read_questions")."""
    read = [r["em"] for r in records if 0 < r["first_hit_rank"] <= top_k]
    return {"reading_accuracy": float(np.mean(read)) if read else 0.0, "read_questions": len(read)}


def write_predictions(path: str, records: list[dict], iteration: int = 0) -> None:
    """JSON lines, written to a temporary name then renamed (never a half-written file)."""
    path = path.replace("{iteration}", str(iteration))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- several QA files

def expand_qa_files(patterns: Sequence[str], flag: str) -> list[str]:
    """Paths and glob patterns -> the files, in the order given (a pattern's matches sorted),
    each once. A pattern that matches nothing, or a missing path, is a ``ConfigError``."""
    from megatron.emdr2.config import ConfigError

    out: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"{flag} {pattern}: no file matches")
        elif not os.path.isfile(pattern):
            raise ConfigError(f"{flag} {pattern}: no such file")
        else:
            matches = [pattern]
        out += [m for m in matches if m not in out]
    return out


def result_names(paths: Sequence[str]) -> list[str]:
    """A short unique name per file for its result files: the file name without its extension
    ("nq-test.csv" -> "nq-test"); repeated names get "-2", "-3"... in the order given."""
    names, seen = [], {}
    for path in paths:
        base = os.path.basename(path)
        stem = base.split(".")[0] or base
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def load_qa_sets(paths: Sequence[str], max_questions: Optional[int] = None) -> list[tuple]:
    """(name, path, examples) per QA file (any format ``load_qa`` reads); bad records raise
    ``DataError`` naming the file and record."""
    from megatron.emdr2.data.qa import load_qa

    sets = []
    for name, path in zip(result_names(paths), paths):
        examples = load_qa(path)
        if max_questions:
            examples = examples[:max_questions]
        sets.append((name, path, examples))
    return sets


def write_json_atomic(path: str, obj) -> None:
    from megatron.emdr2 import fileio

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fileio.atomic_write_text(path, json.dumps(obj, indent=1) + "\n", tmp_suffix=".partial")


def score_files(task, models, sets: Sequence[tuple], out_dir: Optional[str], iteration: int = 0,
                about: Optional[dict] = None, predictions: bool = True,
                predictions_file: Optional[str] = None) -> dict[str, dict]:
    """Evaluate each (name, path, examples) and, when ``out_dir`` is given, write
    ``out_dir/<name>.json`` (the metrics, plus "qa_file", "iteration" and ``about``; atomically,
    by the first rank) and ``out_dir/<name>.predictions.jsonl``; ``predictions_file`` (its
    "{name}" replaced) overrides where predictions go. Logs each file's metrics; returns
    {name: metrics}. Collective over data-parallel ranks."""
    first = not dist.is_initialized() or dist.get_rank() == 0
    results = {}
    for name, path, examples in sets:
        preds = None
        if predictions_file:
            preds = predictions_file.replace("{name}", name)
        elif out_dir and predictions:
            preds = os.path.join(out_dir, f"{name}.predictions.jsonl")
        metrics = evaluate_open_qa(task, models, examples, iteration=iteration, predictions_file=preds)
        results[name] = metrics
        if first:
            logger.info("%s (%s) at iteration %d: %s", name, path, iteration,
                        " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in metrics.items()))
            if out_dir:
                out = os.path.join(out_dir, f"{name}.json")
                write_json_atomic(out, {**metrics, "qa_file": os.path.abspath(path), "iteration": iteration,
                                        **(about or {})})
                logger.info("%s: wrote %s", name, out)
    return results
