#!/usr/bin/env python
"""Split Wikipedia articles (WikiExtractor --json output: one {"id", "title", "text"} per line;
files, .bz2/.gz files, or directories such as AA/wiki_00 ...) into 100-word passages, written
as an evidence tsv in DPR's psgs_w100.tsv layout (header id, text, title).

DPR's conventions: whitespace words, disjoint blocks of --words words per article (the last
may be shorter), the title line at the start of each article's text, disambiguation pages left
out, ids from --start-id in input order.

Example:
  python tools/split_wikipedia.py --input extracted/ --output wiki_psgs_w100.tsv --workers 16
then: python tools/preprocess_evidence.py --input wiki_psgs_w100.tsv --output-prefix wiki/psgs
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.emdr2.data.errors import DataError  # noqa: E402
from megatron.emdr2.data.wiki_split import split_wikipedia  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="WikiExtractor JSON-lines files or directories")
    p.add_argument("--output", required=True, help="output tsv")
    p.add_argument("--words", type=int, default=100, help="words per passage (DPR: 100)")
    p.add_argument("--start-id", type=int, default=1, help="id of the first passage (DPR: 1)")
    p.add_argument("--title-in-text", choices=["auto", "prepend", "never"], default="auto",
                   help="begin each article's text with its title (auto: unless it already does)")
    p.add_argument("--keep-disambiguation", action="store_true", help="keep '(disambiguation)' pages")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="splitting processes (0 = in the main process)")
    p.add_argument("--chunk-lines", type=int, default=500, help="articles per work item")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed articles (counted and reported) instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        counts = split_wikipedia(args.input, args.output, words=args.words, start_id=args.start_id,
                                 workers=args.workers, chunk_lines=args.chunk_lines,
                                 title_in_text=args.title_in_text, keep_disambiguation=args.keep_disambiguation,
                                 on_error="skip" if args.skip_invalid else "raise", progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
