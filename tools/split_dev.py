"""Carve a seeded dev split out of a training set, for datasets without an official one (WebQuestions).

    python tools/split_dev.py data/webquestions/trainmodel.json data/webquestions/val.json \
        data/webquestions/devtest.json --out-dir data/qas/webq-split --dev-fraction 0.1 --seed 1234

Reads one or more QA files of one layout (any layout `megatron.emdr2.data.qa` reads: tsv, jsonl,
DPR/FiD json, WebQuestions json, TriviaQA json). Every record is validated first; a bad one stops
the tool with one line naming the file and the line or record. The files are concatenated in the
order given, a permutation drawn from `--seed` alone picks round(fraction x N) of the N questions
for dev, and the rest are train. Both keep the input order and the input's layout: records (JSON)
or lines (tsv, jsonl) are copied unchanged, so ids and extra fields survive.

Writes OUT/train.<ext>, OUT/dev.<ext> and OUT/split.json (the inputs with their sha256, the seed,
the fraction, the counts and the dev questions' ids), each atomically (temporary file, fsync,
rename), the manifest last: a run that stops half-way leaves no manifest, so it is never mistaken
for a finished split. Running again with the same inputs (by content) and settings does nothing,
so a script can call it every time; a different split already in OUT is an error unless --force.

Provenance, checked against DevSinghSachan/emdr2: the original repository has no split tool. Its
examples/openqa/emdr2_webq.sh reads `webq-dev.csv` (and `webq-train.csv`) from the downloaded
qas.tar.gz, i.e. the dev split that came with the data; DPR (Karpukhin et al. 2020) reports
WebQuestions as 3,417 train / 361 dev (about 10% of the 3,778 original training questions) /
2,032 test. This tool makes a split of that kind reproducibly; it does not recover DPR's questions.
If you have the original's webq-train.csv and webq-dev.csv, use them directly (TRAIN=..., DEV=...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from megatron.emdr2.data.errors import DataError  # noqa: E402
from megatron.emdr2.data.qa import load_qa  # noqa: E402
from megatron.emdr2.fileio import atomic_write_text, sha256_file  # noqa: E402

PROG = "split_dev"
MANIFEST = "split.json"
EXTENSIONS = {"tsv": "tsv", "jsonl": "jsonl", "dpr": "json", "fid": "json", "webq": "json", "triviaqa": "json"}


class SplitError(Exception):
    """A problem with the request or the output folder (one line)."""


def _records(path: str, fmt: str, text: str) -> tuple[list, dict | None]:
    """The raw records of a file the loader accepted, one per question, in order; for TriviaQA
    also the top-level object (its other keys are kept in the output)."""
    if fmt in ("tsv", "jsonl"):
        lines = text.split("\n")
        if lines and not lines[-1].strip():
            lines = lines[:-1]  # the empty remainder after the final newline
        return [line.rstrip("\r") for line in lines], None
    data = json.loads(text)
    if fmt == "triviaqa":
        return list(data["Data"]), data
    return list(data), None


def read_inputs(paths: list[str]):
    """(format, [(path, record)], [(path, qid)], input descriptions); raises DataError/SplitError."""
    fmt, rows, ids, inputs, top = None, [], [], [], None
    for path in paths:
        qa = load_qa(path)  # validates every record; DataError names the file and line/record
        if fmt is not None and qa.fmt != fmt:
            raise SplitError(f"{path}: layout {qa.fmt} differs from {paths[0]}'s {fmt}; give files of one layout")
        fmt = qa.fmt
        with open(path, encoding="utf-8") as f:
            text = f.read()
        text = text[1:] if text.startswith("\ufeff") else text
        records, top_level = _records(path, fmt, text)
        if len(records) != len(qa):
            raise SplitError(f"{path}: {len(records)} records but {len(qa)} questions were read")
        top = top if top is not None else top_level
        rows.extend(records)
        ids.extend(f"{os.path.basename(path)}:{ex.qid}" for ex in qa)
        inputs.append({"path": path, "sha256": sha256_file(path), "questions": len(qa)})
    return fmt, rows, ids, inputs, top


def dev_positions(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the dev questions: the first round(fraction x n) of a seeded permutation."""
    n_dev = int(round(fraction * n))
    if not 1 <= n_dev <= n - 1:
        raise SplitError(f"a dev fraction of {fraction} of {n} questions leaves {n_dev} for dev; "
                         f"both splits need at least one question")
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_dev])


def _render(fmt: str, records: list, top: dict | None) -> str:
    if fmt in ("tsv", "jsonl"):
        return "".join(r + "\n" for r in records)
    body = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]"
    if fmt == "triviaqa":
        head = {k: v for k, v in (top or {}).items() if k != "Data"}
        return json.dumps({**head, "Data": "@DATA@"}, ensure_ascii=False).replace('"@DATA@"', body) + "\n"
    return body + "\n"


def _settings(manifest: dict) -> tuple:
    return ([i["sha256"] for i in manifest.get("inputs", [])], manifest.get("seed"),
            manifest.get("dev_fraction"))


def _up_to_date(out: Path, manifest: dict) -> bool:
    for key in ("train", "dev"):
        f = out / manifest[key]
        if not f.is_file() or sha256_file(f) != manifest[f"{key}_sha256"]:
            return False
    return True


def split(paths: list[str], out_dir: str, dev_fraction: float = 0.1, seed: int = 1234,
          force: bool = False) -> dict:
    """Write the split (see the module docstring) and return its manifest."""
    if not 0.0 < dev_fraction < 1.0:
        raise SplitError(f"--dev-fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    fmt, rows, ids, inputs, top = read_inputs(paths)
    dev = dev_positions(len(rows), dev_fraction, seed)
    ext = EXTENSIONS[fmt]
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    wanted = {"inputs": inputs, "seed": seed, "dev_fraction": dev_fraction}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise SplitError(f"{manifest_path}: unreadable manifest ({e}); remove it or pass --force") from None
        if _settings(old) == _settings(wanted) and old.get("format") == fmt and _up_to_date(out, old):
            return old
        if _settings(old) != _settings(wanted) and not force:
            raise SplitError(f"{out}: holds a different split (other inputs, seed or fraction, see {manifest_path}); "
                             f"pass --force to replace it or choose another --out-dir")
    else:
        existing = [p for p in (out / f"train.{ext}", out / f"dev.{ext}") if p.exists()]
        if existing and not force:
            raise SplitError(f"{existing[0]}: exists but {manifest_path} does not (not a finished split_dev "
                             f"output); pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        manifest_path.unlink()  # a rewrite in progress is never taken for a finished split
    in_dev = np.zeros(len(rows), dtype=bool)
    in_dev[dev] = True
    train_rows = [r for r, d in zip(rows, in_dev) if not d]
    dev_rows = [r for r, d in zip(rows, in_dev) if d]
    files = {}
    for key, part in (("train", train_rows), ("dev", dev_rows)):
        name = f"{key}.{ext}"
        atomic_write_text(out / name, _render(fmt, part, top))
        files[key], files[f"{key}_sha256"] = name, sha256_file(out / name)
    manifest = {**wanted, "format": fmt, **files, "train_examples": len(train_rows),
                "dev_examples": len(dev_rows), "dev_ids": [ids[i] for i in dev]}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="QA files of one layout, concatenated in this order")
    p.add_argument("--out-dir", required=True, help="where train.<ext>, dev.<ext> and split.json go")
    p.add_argument("--dev-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--force", action="store_true", help="replace a different split in --out-dir")
    p.add_argument("--get", nargs="+", choices=("train", "dev", "train_examples", "dev_examples"), default=None,
                   help="after splitting, print only these, one a line (paths for train/dev), for scripts")
    args = p.parse_args(argv)
    try:
        m = split(args.inputs, args.out_dir, args.dev_fraction, args.seed, args.force)
    except (DataError, SplitError) as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: {e.filename or args.out_dir}: {e.strerror}\n")
        return 2
    if args.get:
        for key in args.get:
            print(os.path.join(args.out_dir, m[key]) if key in ("train", "dev") else m[key])
    else:
        print(f"{PROG}: {m['train_examples']} train / {m['dev_examples']} dev questions in {args.out_dir} "
              f"(seed {m['seed']}, fraction {m['dev_fraction']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
