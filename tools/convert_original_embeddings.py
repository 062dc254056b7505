"""Convert the original EMDR² release's evidence embeddings (a pickle) into our fp16 index.

    python tools/convert_original_embeddings.py --pickle nq-ssm-step9000.pkl \
        --out runs/nq-index/step-00009000 --num-shards 16 --model-step 9000
    # the per-rank pickles the original leaves in <name>_tmp/ before merging work too:
    python tools/convert_original_embeddings.py --pickle emb_tmp/*.pkl --out runs/index/step-00000000

Rows are written in evidence-id order, through memory-mapped shard files, and the manifest is
published last (a reader never sees a half-written index). The pickle itself has to fit in
memory (it is one dict: the original's 21M x 768 file needs about 40 GB of RAM to unpickle).
The published version directory's parent gets a ``LATEST`` pointer, so ``--index-dir`` of the
tasks can be that parent.
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pickle", nargs="+", required=True, help="the original's embedding pickle(s)")
    p.add_argument("--out", required=True, help="index version directory to write (e.g. root/step-00000000)")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--model-step", type=int, default=0, help="training step of the context tower")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.emdr2.index.shard_store import IndexStoreError
    from megatron.emdr2.interop.original import read_embedding_pickles, write_embeddings_index
    from megatron.emdr2.models.convert import ConversionError

    if args.num_shards < 1:
        print("error: --num-shards must be >= 1", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        data = read_embedding_pickles(args.pickle)
        rows = len(data)
        manifest = write_embeddings_index(data, args.out, args.num_shards, args.model_step,
                                          args.overwrite, extra={"converted_from": args.pickle},
                                          source=", ".join(args.pickle))
    except (ConversionError, IndexStoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {rows} x {manifest.dim} fp16 embeddings in {args.num_shards} shard(s) to {args.out} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
