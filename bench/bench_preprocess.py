#!/usr/bin/env python
"""Benchmark tools/preprocess_evidence.py on synthetic evidence: peak RSS and rows/s.

Generates a deterministic psgs_w100-like tsv (100-word passages from the BERT vocabulary, 1% of
fields CSV-quoted as in DPR's file), preprocesses it in a subprocess, and reports wall time,
rows/s and the peak resident memory of the main process and of the largest worker. Several
sizes (--rows 100000,1000000) show whether memory grows with the corpus (it should not).
A sample of rows is read back and compared with the tsv.

  python bench/bench_preprocess.py --rows 1000000 --workers 2 --json bench_preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.emdr2.data.evidence import load_evidence, read_evidence_tsv  # noqa: E402
from megatron.emdr2.data.tokenizer import default_vocab_file  # noqa: E402


def word_list() -> np.ndarray:
    words = [w.strip() for w in open(default_vocab_file(), encoding="utf-8")]
    words = [w for w in words if w.isalpha() and not w.startswith("[")]
    words += ["Zürich", "café", "U.S.", "1,000", "(born", "1967)", "—", "naïve", "São"]
    return np.array(words, dtype=object)


def generate(path: str, rows: int, words_per_row: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = word_list()
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        chunk = 20000
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            body = vocab[rng.integers(0, len(vocab), size=(n, words_per_row))]
            heads = vocab[rng.integers(0, len(vocab), size=(n, 2))]
            quoted = rng.random(n) < 0.01
            lines = []
            for k in range(n):
                text = " ".join(body[k])
                title = " ".join(heads[k]).title()
                if quoted[k]:  # DPR-style CSV quoting of a field that contains quotes
                    text = '"' + ('He said "' + text + '"').replace('"', '""') + '"'
                lines.append(f"{start + k + 1}\t{text}\t{title}\n")
            f.write("".join(lines))
    os.replace(tmp, path)


def verify(tsv: str, prefix: str, sample: int, seed: int = 1) -> int:
    ev = load_evidence(prefix)
    rows = set(np.random.default_rng(seed).choice(len(ev), size=min(sample, len(ev)), replace=False).tolist())
    checked = 0
    for row, (pid, text, title) in enumerate(read_evidence_tsv(tsv)):
        if row in rows:
            assert ev.ids[row] == pid and ev.text(row) == text and ev.title(row) == title, f"row {row} differs"
            checked += 1
    assert checked == len(rows) and len(ev) == row + 1
    return checked


def run_one(rows: int, workers: int, workdir: str, sample: int) -> dict:
    tsv = os.path.join(workdir, f"synthetic_{rows}.tsv")
    t0 = time.perf_counter()
    generate(tsv, rows)
    gen_s = time.perf_counter() - t0
    prefix = os.path.join(workdir, f"synthetic_{rows}")
    stats_file = prefix + "_stats.json"
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_evidence.py"), "--input", tsv,
           "--output-prefix", prefix, "--workers", str(workers), "--quiet", "--stats-json", stats_file]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    stats = json.load(open(stats_file))
    out_bytes = sum(os.path.getsize(os.path.join(workdir, f)) for f in os.listdir(workdir)
                    if f.startswith(f"synthetic_{rows}_") and not f.endswith("stats.json"))
    checked = verify(tsv, prefix, sample) if sample else 0
    return {
        "rows": rows, "workers": workers, "input_mb": round(os.path.getsize(tsv) / 2 ** 20, 1),
        "output_mb": round(out_bytes / 2 ** 20, 1), "generate_s": round(gen_s, 1),
        "wall_s": round(wall, 1), "rows_per_s": round(rows / wall),
        "tool_rows_per_s": stats["rows_per_s"],
        "peak_rss_main_mb": round(stats["peak_rss"]["main_mb"], 1),
        "peak_rss_worker_mb": round(stats["peak_rss"]["largest_worker_mb"], 1),
        "verified_rows": checked, "command": " ".join(cmd[1:]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1000000", help="comma-separated corpus sizes")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--workdir", default=None, help="where to write (default: a fresh temp dir, removed after)")
    p.add_argument("--verify-sample", type=int, default=1000, help="rows read back and compared (0: skip)")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(workdir, exist_ok=True)
    results = []
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            results.append(run_one(rows, args.workers, workdir, args.verify_sample))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    cols = ["rows", "workers", "input_mb", "output_mb", "wall_s", "rows_per_s", "peak_rss_main_mb",
            "peak_rss_worker_mb", "verified_rows"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"cpu: {os.cpu_count()} cores; command: {results[-1]['command']}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"results": results, "cpu_count": os.cpu_count()}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
