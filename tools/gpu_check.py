"""One command that exercises every CUDA/NCCL path of the project and prints one table and a JSON.

    python tools/gpu_check.py                       # on this machine's GPUs (about 8 minutes)
    python tools/gpu_check.py --device cpu          # the same checks, tiny sizes, on the CPU (a test runs this)
    python tools/gpu_check.py --only train:emdr2 search   # a subset (names start with these)

Every check runs the project's own entry points as a user would (``python -m tasks.openqa.*``,
``tools/*.py``, torchrun for several ranks) on the bundled nq-mini, with randomly initialised
models (nothing is downloaded):

  train:<task>:<precision>:tiny   2 steps of ICT, DPR, MSS and EMDR² (tiny models) in fp16 (dynamic
                                   loss scaling) and bf16; on a CPU also fp32 and --autocast bf16
  fp16:overflow                    steps whose loss scale (from 2^24) overflows are skipped and the
                                   scale halves until the steps update again
  train:emdr2:paper                paper-size EMDR² steps: BERT-base towers, a T5-base-size reader,
                                   K = 50, query/reader/answer lengths as examples/emdr2_nq.sh; its
                                   step time and model-FLOPs utilisation (MFU)
  search:fp16                      exact top-k search over a GPU-resident fp16 index; achieved memory
                                   bandwidth as a fraction of the device's measured copy bandwidth
  embed:distributed                tools/build_index.py on 2 ranks (NCCL on GPUs, gloo on a CPU), then
                                   tools/eval_retrieval.py searching the index sharded over 2 ranks
  refresh:async                    EMDR² with 1 trainer + 1 indexer rank: the trainer switches to an
                                   index the indexer re-embedded
  checkpoint:resume                EMDR² saves and exits at --exit-interval, then resumes with --load

Exit status 0 when every check that ran passed. ``--json`` (default <out>/gpu_check.json) holds
the table's rows with their numbers; see docs/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
NQ_MINI = ROOT / "data" / "nq-mini"
SENTENCES = ROOT / "tests" / "fixtures" / "mss" / "nq_mini_first80.jsonl"

TINY_RETRIEVER = ["--retriever-num-layers", "2", "--retriever-hidden-size", "64", "--retriever-num-attention-heads", "4",
                  "--retriever-seq-length", "128", "--query-max-len", "32", "--context-max-len", "96"]
TINY_READER = ["--reader-num-layers", "2", "--reader-hidden-size", "64", "--reader-num-attention-heads", "4",
               "--reader-max-len", "128", "--answer-max-len", "16"]
QUIET = ["--no-progress-bar", "--log-interval", "1", "--embed-batch-size", "64"]

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), for MFU against the spec;
# MFU against the measured matmul rate is reported too.
SPEC_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class Result:
    name: str
    status: str = "ok"            # ok | FAIL | skipped
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)
    detail: str = ""


class CheckFailed(Exception):
    pass


class Context:
    def __init__(self, device: str, out: Path, timeout: float):
        self.device, self.out, self.timeout = device, out, timeout
        self.gpus = _gpu_count() if device == "cuda" else 0
        self.evidence = out / "evidence.tsv"
        with open(NQ_MINI / "evidence.tsv", encoding="utf-8") as f, open(self.evidence, "w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if i > 300:
                    break
                g.write(line)
        self.dpr_train = out / "train.jsonl"  # questions whose gold passage is in the slice
        lines = [l for l in (NQ_MINI / "train.jsonl").read_text().splitlines()
                 if json.loads(l)["gold_passage_id"] <= 300]
        self.dpr_train.write_text("\n".join(lines[:32]) + "\n")

    def env(self, threads: int = 2) -> dict:
        e = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        e.update(PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
                 OMP_NUM_THREADS=str(threads))
        if self.device == "cpu":
            e["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
        return e

    def run(self, argv: list[str], nproc: int = 1, timeout: Optional[float] = None) -> str:
        """Run a module (``-m x.y``) or script; several ranks through torchrun. Returns its output."""
        if nproc > 1:
            from megatron.emdr2.initialize import free_port

            argv = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                    str(free_port()), *argv]  # torchrun takes "-m module ..." or "script ..." alike
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=self.env(2 if nproc == 1 else 1),
                              capture_output=True, text=True, timeout=timeout or self.timeout)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            tail = [l for l in out.strip().splitlines() if l.strip()][-3:]
            raise CheckFailed(f"exit {proc.returncode}: {' | '.join(tail)[-600:]}")
        return out


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _records(path: Path, kind: str = "train") -> list[dict]:
    if not path.exists():
        raise CheckFailed(f"{path}: no metrics written")
    return [r for r in (json.loads(l) for l in path.read_text().splitlines() if l.strip()) if r.get("kind") == kind]


def _precisions(ctx: Context) -> list[tuple[str, list[str]]]:
    half = [("fp16", ["--fp16"]), ("bf16", ["--bf16"])]
    if ctx.device == "cuda":
        return half
    return [("fp32", []), ("autocast-bf16", ["--autocast", "bf16"]), *half]  # the GPU's precisions run here too


def _task_flags(task: str, ctx: Context, d: Path) -> list[str]:
    if task == "ict":
        return ["-m", "tasks.openqa.ict", *TINY_RETRIEVER, *QUIET, "--evidence", str(ctx.evidence), "--dev-data", "",
                "--global-batch-size", "8", "--micro-batch-size", "4"]
    if task == "dpr":
        return ["-m", "tasks.openqa.dpr", *TINY_RETRIEVER, *QUIET, "--evidence", str(ctx.evidence), "--dev-data", "",
                "--train-data", str(ctx.dpr_train), "--global-batch-size", "4", "--micro-batch-size", "2",
                "--hard-negatives", "1"]
    joint = [*TINY_RETRIEVER, *TINY_READER, *QUIET, "--evidence", str(ctx.evidence), "--index-dir", str(d / "index"),
             "--top-k", "4", "--global-batch-size", "4", "--micro-batch-size", "2", "--index-reload-interval", "2",
             "--reader-copy-head"]
    if task == "mss":
        return ["-m", "tasks.openqa.mss", *joint, "--mss-data", str(SENTENCES), "--mss-dev-sentences", "4",
                "--mss-max-spans", "2"]
    return ["-m", "tasks.openqa.emdr2", *joint, "--train-data", str(NQ_MINI / "train.tsv")]


def _steps_ok(records: list[dict], iters: int) -> dict:
    import math

    if [r["iteration"] for r in records] != list(range(1, iters + 1)):
        raise CheckFailed(f"logged iterations {[r['iteration'] for r in records]}, expected 1..{iters}")
    bad = [r["iteration"] for r in records if not math.isfinite(r["loss"])]
    if bad:
        raise CheckFailed(f"non-finite loss at iterations {bad}")
    times = [r["step_time"] for r in records[1:]] or [records[0]["step_time"]]
    return {"loss_first": round(records[0]["loss"], 4), "loss_last": round(records[-1]["loss"], 4),
            "step_ms": round(1000 * statistics.median(times), 1)}


def check_train(task: str, precision: str, flags: list[str]) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        d = Path(tempfile.mkdtemp(prefix=f"{task}-{precision}-", dir=ctx.out))
        ctx.run([*_task_flags(task, ctx, d), *flags, "--train-iters", "2", "--lr", "1e-4",
                 "--metrics-file", str(d / "metrics.jsonl")])
        return _steps_ok(_records(d / "metrics.jsonl"), 2)
    return run


def check_fp16_overflow(ctx: Context) -> dict:
    """A loss scale of 2^24 overflows fp16 gradients: the step is skipped and (hysteresis 1) the
    scale halves, step after step, until the gradients fit and the steps update again."""
    d = Path(tempfile.mkdtemp(prefix="overflow-", dir=ctx.out))
    ctx.run([*_task_flags("ict", ctx, d), "--fp16", "--initial-loss-scale", str(2.0 ** 24), "--hysteresis", "1",
             "--train-iters", "24", "--lr", "1e-4", "--metrics-file", str(d / "metrics.jsonl")])
    recs = _records(d / "metrics.jsonl")
    skipped = [r["iteration"] for r in recs if r.get("skipped")]
    scales = [r["loss_scale"] for r in recs]
    if not skipped or skipped[0] != 1:
        raise CheckFailed(f"no overflowing first step was skipped (skipped: {skipped}, scales {scales})")
    if not scales[-1] < scales[0]:
        raise CheckFailed(f"the loss scale did not drop after an overflow: {scales}")
    if len(skipped) == len(recs):
        raise CheckFailed(f"every step was skipped: scales {scales}")
    return {"skipped_steps": len(skipped), "first_scale": scales[0], "last_scale": scales[-1]}


def emdr2_model_flops(k: int, lq: int, lc: int, lr: int, la: int, h: int = 768, layers: int = 12,
                      ffn: int = 3072, vocab: int = 30720, rh: int = 768, rlayers: int = 12, rffn: int = 3072) -> float:
    """Model FLOPs of one EMDR² training example (forward + backward = 3 x forward), counting the
    matmuls of: the query tower on the question, the context tower re-scoring the K passages, the
    FiD reader's encoder on K x lr tokens, its decoder over the K x lr memory (teacher forcing) and
    once per passage for the K per-passage likelihoods (forward only there: no reader gradient
    flows through them); the index refresh is not counted (indexer ranks do it). ``vocab``: the
    reader's (BERT's 30,522 WordPieces plus [BOS], [EOS] and 100 sentinels, padded to 128)."""
    def encoder(tokens, seq, hid, nl, f):  # per layer: QKV+out 8h², FFN 4hf, scores+values 4·seq·h
        return tokens * nl * (8 * hid * hid + 4 * hid * f + 4 * seq * hid)

    def decoder(tokens, memory, hid, nl, f):  # self-attn, cross-attn, FFN, and the memory's K/V projections
        per_layer = tokens * (8 * hid * hid + 4 * tokens * hid + 4 * hid * hid + 4 * memory * hid + 4 * hid * f)
        return nl * (per_layer + memory * 4 * hid * hid) + tokens * 2 * hid * vocab

    fwd_trained = (encoder(lq, lq, h, layers, ffn) + encoder(k * lc, lc, h, layers, ffn)
                   + encoder(k * lr, lr, rh, rlayers, rffn) + decoder(la, k * lr, rh, rlayers, rffn))
    per_passage = k * decoder(la, lr, rh, rlayers, rffn)
    return 3 * fwd_trained + per_passage


def _measured_matmul_peak(device: str) -> float:
    import torch

    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    reps = 20 if device == "cuda" else 3
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def check_paper_emdr2(ctx: Context) -> dict:
    d = Path(tempfile.mkdtemp(prefix="paper-", dir=ctx.out))
    k, lq, lc, lr, la = 50, 256, 256, 512, 32  # examples/emdr2_nq.sh (context: the default 256)
    precision = ["--bf16"] if ctx.device == "cuda" else ["--autocast", "bf16"]
    iters = 4
    ctx.run(["-m", "tasks.openqa.emdr2", *QUIET, "--evidence", str(ctx.evidence), "--index-dir", str(d / "index"),
             "--train-data", str(NQ_MINI / "train.tsv"), "--dev-data", "", "--top-k", str(k),
             "--query-max-len", str(lq), "--context-max-len", str(lc), "--reader-max-len", str(lr),
             "--answer-max-len", str(la), "--global-batch-size", "1", "--micro-batch-size", "1",
             "--train-iters", str(iters), "--lr", "2e-5", "--index-reload-interval", "0", *precision,
             "--metrics-file", str(d / "metrics.jsonl")], timeout=max(ctx.timeout, 900))
    numbers = _steps_ok(_records(d / "metrics.jsonl"), iters)
    step = numbers["step_ms"] / 1000
    flops = emdr2_model_flops(k, lq, lc, lr, la)
    achieved = flops / step
    peak = _measured_matmul_peak(ctx.device)
    numbers.update(model_tflop_per_step=round(flops / 1e12, 2), achieved_tflops=round(achieved / 1e12, 2),
                   matmul_peak_tflops=round(peak / 1e12, 1), mfu_vs_measured_matmul=round(achieved / peak, 3))
    if ctx.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        spec = next((v for key, v in SPEC_BF16_PEAK.items() if key in name), None)
        numbers["gpu"] = name
        numbers["peak_gpu_gib"] = round(_peak_memory_from(ctx, d), 2)
        if spec:
            numbers["mfu_vs_spec"] = round(achieved / spec, 3)
    return numbers


def _peak_memory_from(ctx: Context, d: Path) -> float:
    recs = _records(d / "metrics.jsonl")
    return max((r.get("gpu_peak_gib", 0.0) for r in recs), default=0.0)


def check_search(ctx: Context) -> dict:
    """Exact top-100 over an fp16 index resident on the device: bytes of the index / search time,
    against the device's copy bandwidth (read + write of a buffer as large as the index)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from megatron.emdr2.index import TiledSearcher

    dev = ctx.device
    dim = 768
    if dev == "cuda":
        free, _ = torch.cuda.mem_get_info()
        rows = int(min(8 << 30, free // 4) // (2 * dim))
    else:
        rows = 100_000
    g = torch.Generator(device="cpu").manual_seed(0)
    vectors = torch.randn(rows, dim, generator=g, dtype=torch.float32).to(torch.float16).to(dev)
    queries = torch.randn(64, dim, generator=g).to(dev)
    searcher = TiledSearcher(vectors)
    searcher.search(queries, 100)
    _sync(dev)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        searcher.search(queries, 100)
        _sync(dev)
        times.append(time.perf_counter() - t)
    search_s = statistics.median(times)
    # exactness against an fp32 matmul on a slice
    s, idx = searcher.search(queries[:4], 10)
    ref = (queries[:4].float() @ vectors.float().T).topk(10, dim=1)
    overlap = float((idx.cpu() == ref.indices.cpu()).float().mean())
    dst = torch.empty_like(vectors)
    dst.copy_(vectors)
    _sync(dev)
    copies = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(vectors)
        _sync(dev)
        copies.append(time.perf_counter() - t)
    nbytes = vectors.numel() * 2
    copy_bw = 2 * nbytes / statistics.median(copies)
    search_bw = nbytes / search_s
    if overlap < 0.9:
        raise CheckFailed(f"search disagrees with an fp32 matmul top-10 ({overlap:.2f} of ids equal)")
    return {"rows": rows, "dim": dim, "index_gib": round(nbytes / 2 ** 30, 2), "queries": 64, "k": 100,
            "search_ms": round(1000 * search_s, 2), "search_gbps": float(f"{search_bw / 1e9:.3g}"),
            "copy_gbps": float(f"{copy_bw / 1e9:.3g}"), "fraction_of_copy_bw": round(search_bw / copy_bw, 3),
            "top10_equal_fp32": round(overlap, 3)}


def _tiny_retriever_checkpoint(ctx: Context) -> Path:
    """A tiny ICT checkpoint (1 step) to embed and search with."""
    d = ctx.out / "tiny-ict"
    if not (d / "latest").exists():
        ctx.run([*_task_flags("ict", ctx, d), "--train-iters", "1", "--save", str(d)])
    return d


def check_distributed_embedding(ctx: Context) -> dict:
    ckpt = _tiny_retriever_checkpoint(ctx)
    d = Path(tempfile.mkdtemp(prefix="embed-", dir=ctx.out))
    t = time.perf_counter()
    ctx.run([str(ROOT / "tools" / "build_index.py"), "--checkpoint", str(ckpt), "--evidence", str(ctx.evidence),
             "--output", str(d / "index"), "--no-progress-bar"], nproc=2)
    embed_s = time.perf_counter() - t
    manifest = json.loads(next((d / "index").glob("step-*/manifest.json")).read_text())
    rows = sum(s["rows"] for s in manifest["shards"])
    if len(manifest["shards"]) != 2 or rows != 300:
        raise CheckFailed(f"expected 2 shards of 300 rows in all, got {len(manifest['shards'])} / {rows}")
    ctx.run([str(ROOT / "tools" / "eval_retrieval.py"), "--checkpoint", str(ckpt), "--index", str(d / "index"),
             "--evidence", str(ctx.evidence), "--qa-file", str(ctx.dpr_train), "--metrics-out",
             str(d / "retrieval.json")], nproc=2)
    m = json.loads((d / "retrieval.json").read_text())
    return {"ranks": 2, "rows": rows, "embed_s": round(embed_s, 1), "questions": m["questions"],
            "top20": round(m["top20"], 3)}


def check_async_refresh(ctx: Context) -> dict:
    d = Path(tempfile.mkdtemp(prefix="async-", dir=ctx.out))
    flags = _task_flags("emdr2", ctx, d)
    out = ctx.run([*flags, "--train-iters", "30", "--lr", "1e-4", "--num-indexer-ranks", "1",
                   "--global-batch-size", "2", "--micro-batch-size", "2",
                   "--metrics-file", str(d / "metrics.jsonl")], nproc=2)
    switches = re.findall(r"switched to index (step-\d+)", out)
    versions = sorted(p.name for p in (d / "index").glob("step-*") if (p / "manifest.json").exists())
    if not switches:
        raise CheckFailed(f"the trainer never switched to a re-embedded index (versions on disk: {versions})")
    return {"trainer_ranks": 1, "indexer_ranks": 1, "switches": len(switches), "versions": len(versions)}


def check_resume(ctx: Context) -> dict:
    d = Path(tempfile.mkdtemp(prefix="resume-", dir=ctx.out))
    flags = [*_task_flags("emdr2", ctx, d), "--train-iters", "4", "--lr", "1e-4", "--save", str(d / "ckpt"),
             "--retriever-lr-mult", "0.1", "--reader-encoder-lr-mult", "0.3"]
    if ctx.device == "cuda":
        flags.append("--bf16")
    out = ctx.run([*flags, "--exit-interval", "2", "--metrics-file", str(d / "first.jsonl")])
    if "exiting at iteration 2" not in out:
        raise CheckFailed("the run did not stop at --exit-interval 2")
    out = ctx.run([*flags, "--load", str(d / "ckpt"), "--metrics-file", str(d / "second.jsonl")])
    its = [r["iteration"] for r in _records(d / "second.jsonl")]
    if "resumed from" not in out or its != [3, 4]:
        raise CheckFailed(f"resume ran iterations {its}")
    return {"stopped_at": 2, "resumed_iterations": its}


def all_checks(ctx: Context, size: str) -> list[tuple[str, Callable[[Context], dict]]]:
    checks = []
    if size in ("tiny", "both"):
        for task in ("ict", "dpr", "mss", "emdr2"):
            for precision, flags in _precisions(ctx):
                checks.append((f"train:{task}:{precision}:tiny", check_train(task, precision, flags)))
        checks.append(("fp16:overflow", check_fp16_overflow))  # megatron's fp16 optimizer runs on a CPU too
    if size in ("paper", "both"):
        checks.append(("train:emdr2:paper", check_paper_emdr2))
    checks += [("search:fp16", check_search), ("embed:distributed", check_distributed_embedding),
               ("refresh:async", check_async_refresh), ("checkpoint:resume", check_resume)]
    return checks


def print_table(results: list[Result]) -> None:
    width = max(len(r.name) for r in results)
    print(f"{'check':<{width}}  {'status':<7}  {'seconds':>7}  numbers / detail")
    for r in results:
        info = ", ".join(f"{k}={v}" for k, v in r.numbers.items()) if r.numbers else r.detail
        if r.numbers and r.detail:
            info += f" ({r.detail})"
        print(f"{r.name:<{width}}  {r.status:<7}  {r.seconds:>7.1f}  {info}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--size", choices=["tiny", "paper", "both"], default=None,
                        help="default: both on a GPU, tiny on a CPU")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX", help="run checks whose names start so")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="checks not started within this budget are reported as skipped")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    parser.add_argument("--out", default=None, help="working directory (default: a fresh temporary one)")
    parser.add_argument("--json", default=None, help="results JSON (default: <out>/gpu_check.json)")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible (torch.cuda.is_available() is False)")
    size = args.size or ("both" if device == "cuda" else "tiny")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, out, args.timeout)
    checks = [(n, f) for n, f in all_checks(ctx, size) if not args.only or any(n.startswith(p) for p in args.only)]
    if not checks:
        parser.error(f"--only {' '.join(args.only)} matches no check")

    start = time.perf_counter()
    results = []
    for name, fn in checks:
        if time.perf_counter() - start > 60 * args.budget_minutes:
            results.append(Result(name, "skipped", detail=f"--budget-minutes {args.budget_minutes} spent"))
            continue
        t = time.perf_counter()
        try:
            results.append(Result(name, "ok", numbers=fn(ctx)))
        except CheckFailed as e:
            results.append(Result(name, "FAIL", detail=str(e)))
        except subprocess.TimeoutExpired as e:
            results.append(Result(name, "FAIL", detail=f"timed out after {e.timeout:.0f} s"))
        except Exception as e:  # a check's own bug must not hide the other checks' results
            results.append(Result(name, "FAIL", detail=f"{type(e).__name__}: {e}"))
        results[-1].seconds = time.perf_counter() - t
        print(f"[{time.perf_counter() - start:6.0f}s] {name}: {results[-1].status}", flush=True)

    print()
    print_table(results)
    report = {"device": device, "size": size, "torch": torch.__version__,
              "gpus": [torch.cuda.get_device_name(i) for i in range(ctx.gpus)],
              "seconds": round(time.perf_counter() - start, 1),
              "checks": [r.__dict__ for r in results]}
    path = Path(args.json or out / "gpu_check.json")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"\nJSON: {path}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
