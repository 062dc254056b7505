#!/usr/bin/env python
"""Pre-tokenise an evidence tsv (DPR psgs_w100.tsv layout: id, text, title) into memory-mapped
megatron indexed datasets.

Writes, for --output-prefix P:
  P_text_document.{bin,idx}, P_title_document.{bin,idx}  token ids, one document per passage
                                                         (the layout of the original EMDR² release)
  P_raw.{bin,idx}                                        UTF-8 title and text (exact read-back)
  P_ids.npy                                              passage id of each row
  P_meta.json                                            tokenizer, counts; written last
Load them with megatron.emdr2.data.evidence.load_evidence(P).

Example:
  python tools/preprocess_evidence.py --input psgs_w100.tsv --output-prefix data/wiki/psgs_w100 --workers 16
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.emdr2.data.errors import DataError  # noqa: E402
from megatron.emdr2.data.preprocess import TokenizerSpec, preprocess_evidence  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="evidence tsv (or .tsv.gz) with header id, text, title")
    p.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    p.add_argument("--tokenizer", choices=["bert", "sentencepiece"], default="bert")
    p.add_argument("--vocab-file", default=None, help="WordPiece vocab (default: the vendored bert-base-uncased)")
    p.add_argument("--cased", action="store_true", help="keep case (default: lower-case, as bert-base-uncased)")
    p.add_argument("--spm-model", default=None, help="SentencePiece model for --tokenizer sentencepiece")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenising processes (0 = in the main process)")
    p.add_argument("--chunk-rows", type=int, default=2000, help="rows per work item")
    p.add_argument("--quoting", choices=["auto", "csv", "none"], default="auto",
                   help="CSV-style quoted fields: auto-detect per field (default), always, or never")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed rows (counted and reported) instead of stopping at the first")
    p.add_argument("--no-raw", action="store_true", help="do not store the raw text (smaller; text() then decodes tokens)")
    p.add_argument("--stats-json", default=None, help="also write the run's statistics to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.tokenizer == "sentencepiece" and not args.spm_model:
        p.error("--tokenizer sentencepiece needs --spm-model")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = TokenizerSpec(kind=args.tokenizer, vocab_file=args.vocab_file, lower_case=not args.cased,
                         model_file=args.spm_model)
    try:
        stats = preprocess_evidence(args.input, args.output_prefix, spec, workers=args.workers,
                                    chunk_rows=args.chunk_rows, quoting=args.quoting,
                                    on_error="skip" if args.skip_invalid else "raise",
                                    write_raw=not args.no_raw, progress=not args.quiet)
    except DataError as e:
        print(f"preprocess_evidence: error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(stats)
    print(text)
    if args.stats_json:
        tmp = args.stats_json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.stats_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
