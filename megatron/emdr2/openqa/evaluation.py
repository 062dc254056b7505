"""Open-domain QA evaluation: exact match of generated answers and top-k retrieval accuracy.

Questions are split across data-parallel ranks (each question evaluated once), every rank
runs the same number of (collective) index searches, and the per-question results are
gathered so that every rank returns the same metrics. Predictions go to a JSON-lines file
with the retrieved passages and their retrieval probabilities (the paper's Table 10).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron.emdr2.data.answers import exact_match
from megatron.emdr2.data.inputs import encode_context
from megatron.emdr2.openqa.retrieval import first_hit_ranks, top_k_accuracy

RETRIEVAL_KS = (1, 5, 20)


def _dp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True, leave=False)


@torch.no_grad()
def predict_batch(task, models, examples: Sequence, k_search: int, passages_in_output: int = 5) -> list[dict]:
    """Retrieve, read and answer a batch of questions (answers, if any, are only carried along).

    Each record: question, prediction, the retrieval ranks' passages (id, title, p(z|q) from the
    current towers, over the reader's top-K), and the first-hit rank when gold answers exist.
    """
    biencoder, reader = models["biencoder"], models["reader"]
    qa = task.qa
    batch = task._qa_batch(examples, [e.answers[0] if e.answers else "" for e in examples])
    _, ids, _ = task.retrieve(biencoder, batch, k_search)
    passages = task.passages(ids)
    K = min(qa.top_k, ids.size(1))
    reader_passages = [ps[:K] for ps in passages]
    r_ids, r_mask = task.reader_inputs(batch.questions, reader_passages)
    generated = reader.generate(r_ids, r_mask, max_length=qa.answer_max_len, num_beams=qa.num_beams,
                                bos_id=task.tok.bos_id, eos_id=task.tok.eos_id, pad_id=task.tok.pad_id,
                                no_repeat_ngram_size=qa.no_repeat_ngram_size)
    q_emb = biencoder.embed_queries(batch.query_ids, batch.query_mask)
    c_ids, c_mask = encode_context(task.rtok, [p for ps in reader_passages for p in ps],
                                   qa.context_max_len, pad_to="longest")
    c_emb = biencoder.embed_contexts(c_ids, c_mask).view(len(examples), K, -1)
    probs = torch.softmax(biencoder.score(q_emb, c_emb), dim=-1)
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
                     predictions_file: Optional[str] = None, passages_in_output: int = 5) -> dict:
    """EM and top-k retrieval accuracy of the task's retriever + reader on ``examples``."""
    rank, world, group = _dp()
    mine = list(range(rank, len(examples), world))
    bs = task.qa.eval_batch_size
    steps = math.ceil(math.ceil(len(examples) / world) / bs) if examples else 0
    k_search = max(task.qa.top_k, max(RETRIEVAL_KS))
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
               **top_k_accuracy(ranks, RETRIEVAL_KS), "questions": len(records),
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
