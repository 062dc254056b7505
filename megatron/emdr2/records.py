"""Records of measurements (``docs/results/<name>.json``) and the check that the docs quote them.

Every figure quoted in README.md or docs/*.md cites a committed JSON record written by the command
that produced it. Wrap the command; the record is written only if it exits 0:

    RUN=runs/qs python -m megatron.emdr2.records --name quickstart-avx2 \
        --figures-from runs/qs/final_metrics.json -- bash examples/quickstart.sh

or turn the outputs of a run that has already finished into a record (``recorded_by: "import"``;
its environment fields then describe the machine when the record was written, not the run):

    python -m megatron.emdr2.records --name bm25-dev --command "python tools/mine_negatives.py ..." \
        --figures-from m.json --figure run_seconds=1517 --note "..."

A record (``SCHEMA`` 1) holds ``name``, ``command``, ``recorded_by`` ("run" or "import"),
``commit`` and ``dirty`` (git, read before the command runs), ``date`` (UTC, ISO 8601),
``cpu_model`` (/proc/cpuinfo "model name"), ``cpu_capability``
(``torch.backends.cpu.get_cpu_capability()``), ``threads`` (``torch.get_num_threads()``),
``cpu_count``, ``load_average`` (``os.getloadavg()`` when written), ``torch``, ``python``,
``platform``, ``env`` (the thread and ISA variables that change speed), ``sources`` (the files the
figures were read from), ``note`` and ``figures``: a flat {name: number}; nested JSON is flattened
with dots (``stages.emdr2.em``; list items by index, ``corpora.1.max_rank_bytes``). A wrapped run
adds ``exit_status``, ``wall_seconds`` (also a figure), ``load_average_start`` and
``load_average_max_1m`` (the highest 1-minute load seen while it ran, sampled every 5 s): a timing
taken at a load above the core count is not a measurement of the code.

Citation convention (``check`` below; tests/test_doc_figures.py): a quoted figure is a Markdown
link whose text is the number as printed and whose target is its record, the figure's key as the
fragment (paths relative to the Markdown file, as links are)::

    dev EM [0.339](docs/results/quickstart-avx2.json#em)            in README.md
    [26.4](results/quickstart-avx2.json#wall_seconds/60) min        in docs/; KEY/N or KEY*N scales
    **[35.1](results/x.json#em*100)**%                              formatting around it is fine

The printed number must be the record's value rounded to the printed digits (within half a unit
of its last digit). Link text ``TODO(...)`` marks a figure whose record is still to be written: it
is reported, not checked. Everything from a heading "Unrecorded notes from earlier sessions (no
record; not figures of this project)" to the end of its file is skipped. Elsewhere, a bare number
that looks like a quoted figure (a fraction such as 0.84, or three or more decimals) is reported:
cite it, move it under that heading, or, if it is no measurement (a version, a setting, a
threshold), put it in a code span.

    python -m megatron.emdr2.records check [FILES...]       # default: README.md docs/*.md
    python -m megatron.emdr2.records fill [FILES...]        # TODO placeholders -> their records' figures
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron.emdr2.fileio import atomic_write_text

SCHEMA = 1
ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "docs" / "results"
REQUIRED = ("schema", "name", "command", "recorded_by", "commit", "date", "cpu_model", "cpu_capability",
            "threads", "load_average", "figures")
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
            "CUDA_VISIBLE_DEVICES")
UNRECORDED_HEADING = "Unrecorded notes from earlier sessions (no record; not figures of this project)"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RecordError(Exception):
    pass


# ---------------------------------------------------------------- writing


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_state(root: Path = ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout; ("unknown", None) outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if not commit:
        return "unknown", None
    return commit, bool(status.stdout.strip()) if status.returncode == 0 else None


def environment() -> dict:
    """Where a record was written: CPU, its torch capability, threads, load, versions."""
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def flatten(obj, prefix: str = "") -> dict[str, float]:
    """Numbers of a JSON value, flat: {"a": {"b": [1, 2]}} -> {"a.b.0": 1, "a.b.1": 2}. Strings,
    booleans, nulls and non-finite numbers are left out."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix[:-1]] = obj
    return out


def parse_figure(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecordError(f"--figure {text!r}: expected KEY=NUMBER")
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if math.isfinite(number):
            return key.strip(), number
    raise RecordError(f"--figure {text!r}: {value!r} is not a finite number")


def split_source(spec: str) -> tuple[str, str]:
    """--figures-from FILE[:PREFIX] -> (FILE, PREFIX or "")."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, ""
    path, _, prefix = spec.rpartition(":")
    return path, prefix


def read_figures(path: str, prefix: str = "") -> dict[str, float]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return flatten(data, prefix)


def make_record(name: str, command: str, figures: dict, *, recorded_by: str, sources=(), note: str | None = None,
                run: dict | None = None, env: dict | None = None, commit: tuple[str, bool | None] | None = None) -> dict:
    if not NAME_RE.match(name):
        raise RecordError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    if not figures:
        raise RecordError("no figures: give --figures-from FILE or --figure KEY=NUMBER")
    sha, dirty = commit if commit is not None else git_state()
    record = {"schema": SCHEMA, "name": name, "command": command, "recorded_by": recorded_by,
              "commit": sha, "dirty": dirty,
              "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
              **(env if env is not None else environment())}
    if run:
        record.update(run)
    if sources:
        record["sources"] = list(sources)
    if note:
        record["note"] = note
    record["figures"] = dict(sorted(figures.items()))
    return record


def write_record(record: dict, out_dir: str | os.PathLike = RESULTS_DIR) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['name']}.json"
    atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return path


class _LoadSampler:
    """The highest 1-minute load average seen while a command runs."""

    def __init__(self, every: float = 5.0):
        self.max_1m = os.getloadavg()[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.max_1m = max(self.max_1m, os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.max_1m = max(self.max_1m, os.getloadavg()[0])


def run_command(argv: list[str]) -> dict:
    """Run a command as given (stdin/stdout/stderr inherited); its exit status, wall time and load."""
    start_load = [round(x, 2) for x in os.getloadavg()]
    start = time.monotonic()
    with _LoadSampler() as load:
        try:
            rc = subprocess.call(argv)
        except FileNotFoundError:
            raise RecordError(f"{argv[0]}: command not found") from None
    return {"exit_status": rc, "wall_seconds": round(time.monotonic() - start, 1),
            "load_average_start": start_load, "load_average_max_1m": round(load.max_1m, 2)}


# ---------------------------------------------------------------- reading and checking


def _cached_record(cache: dict, path: Path):
    """``load_record(path)`` once per path; a RecordError is cached (and returned) too."""
    if path not in cache:
        try:
            cache[path] = load_record(path)
        except RecordError as e:
            cache[path] = e
    return cache[path]


def load_record(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path}: no such record") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a JSON object")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"{path}: record lacks {', '.join(missing)}")
    if record["schema"] != SCHEMA:
        raise RecordError(f"{path}: schema {record['schema']!r}, this code reads {SCHEMA}")
    if record["name"] != path.stem:
        raise RecordError(f"{path}: its name is {record['name']!r}, not the file's")
    figures = record["figures"]
    if not isinstance(figures, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures.values()):
        raise RecordError(f"{path}: 'figures' must map names to numbers")
    return record


@dataclasses.dataclass
class Citation:
    file: str
    line: int
    text: str  # the link text as written
    target: str  # the link target as written
    record: Path
    key: str | None
    scale: tuple[str, float] | None  # ("/", 60.0) or ("*", 100.0)


@dataclasses.dataclass
class CheckResult:
    citations: list[Citation]
    problems: list[str]
    placeholders: list[str]


_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_NUMBER = re.compile(r"^(?:[~≈<>≤≥]\s*)?([-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+−]?\d+)?)")
_SUFFIX = re.compile(r"^\s*(?:%|×|x|s|ms|µs|min|h|GB|GiB|MB|MiB|kB|KiB|TB|GFLOP/s|TFLOP/s|rows/s|p/s)?$")
_FRAGMENT = re.compile(r"^(?P<key>.+?)(?:(?P<op>[*/])(?P<n>[0-9.]+(?:[eE][-+]?\d+)?))?$")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
# A quoted figure in the prose of a checked file (outside code, links and the unrecorded notes):
# a fraction or a number with three or more decimals, the kind of figure that metrics are quoted as.
_BARE_FIGURE = re.compile(r"(?<![\w.\-/])(?:0\.\d{2,}|\d+\.\d{3,})(?![\w.])")


def _is_record_target(path: str) -> bool:
    return path.endswith(".json") and ("results/" in path or path.startswith("results"))


def _strip_formatting(text: str) -> str:
    return text.strip().strip("*_").strip()


def _printed_number(text: str) -> tuple[float, float] | None:
    """(value, half a unit of the last printed digit) of a link text such as "0.339", "1,266",
    "26.4 min", "2e-5"; None if the text is not a number."""
    m = _NUMBER.match(text)
    if not m or not _SUFFIX.match(text[m.end():]):
        return None
    raw = m.group(1).replace(",", "").replace("−", "-")
    mantissa, _, exponent = raw.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    half = 0.5 * 10.0 ** (-decimals) * 10.0 ** (int(exponent) if exponent else 0)
    return float(raw), half


def prose_lines(text: str):
    """(line number, line with code spans blanked) of a Markdown text's prose: fenced code blocks are
    skipped, and so is everything from the unrecorded-notes heading on."""
    fence = None
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.lstrip()
        if fence:
            if stripped.startswith(fence):
                fence = None
            continue
        if stripped.startswith("```") or stripped.startswith("~~~"):
            fence = stripped[:3]
            continue
        heading = _HEADING.match(line)
        if heading and UNRECORDED_HEADING.lower() in heading.group(1).lower():
            return
        yield n, _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def check_text(text: str, file: str, base_dir: Path, records: dict | None = None,
               bare_figures: bool = True) -> CheckResult:
    """Every record citation of one Markdown text checked against its record; with
    ``bare_figures`` also every figure-like number outside a citation reported."""
    records = {} if records is None else records
    result = CheckResult([], [], [])
    for n, line in prose_lines(text):
        where = f"{file}:{n}"
        for m in _LINK.finditer(line):
            label, target = _strip_formatting(m.group(1)), m.group(2)
            path, _, fragment = target.partition("#")
            if not _is_record_target(path):
                continue
            record_path = (base_dir / path).resolve()
            if label.startswith("TODO("):
                result.placeholders.append(f"{where}: {label} -> {target}")
                continue
            printed = _printed_number(label)
            if printed is None:
                if fragment:
                    result.problems.append(f"{where}: [{label}]({target}): a cited figure's link text must be "
                                           f"the number as printed")
                elif not record_path.is_file():
                    result.problems.append(f"{where}: [{label}]({target}): no such record")
                continue
            if not fragment:
                result.problems.append(f"{where}: [{label}]({target}): name the figure's key after '#'")
                continue
            fm = _FRAGMENT.match(fragment)
            key, op, factor = fm.group("key"), fm.group("op"), fm.group("n")
            cite = Citation(file, n, label, target, record_path, key, (op, float(factor)) if op else None)
            result.citations.append(cite)
            record = _cached_record(records, record_path)
            if isinstance(record, RecordError):
                result.problems.append(f"{where}: [{label}]({target}): {record}")
                continue
            if key not in record["figures"]:
                result.problems.append(f"{where}: [{label}]({target}): the record has no figure {key!r}")
                continue
            value = record["figures"][key]
            if cite.scale:
                value = value / cite.scale[1] if cite.scale[0] == "/" else value * cite.scale[1]
            number, half = printed
            if abs(number - value) > half * (1 + 1e-9) + 1e-12:
                shown = fragment if cite.scale else key
                result.problems.append(f"{where}: [{label}]({target}) says {label}, but the record's "
                                       f"{shown} is {value:.6g}")
        if bare_figures:
            rest = _LINK.sub(lambda m: " " * len(m.group(0)), line)
            for m in _BARE_FIGURE.finditer(rest):
                result.problems.append(f"{where}: {m.group(0)} is quoted without a record: cite it as "
                                       f"[{m.group(0)}](results/NAME.json#KEY), move it under "
                                       f"'{UNRECORDED_HEADING}', or, if it is no measurement (a version, a "
                                       f"setting, a threshold), put it in a code span")
    return result


def check_files(paths, bare_figures_in=None) -> CheckResult:
    """check_text over files; ``bare_figures_in`` (default: all) names the files whose uncited
    figure-like numbers are reported too."""
    total = CheckResult([], [], [])
    records: dict = {}
    for p in paths:
        p = Path(p)
        bare = bare_figures_in is None or p.resolve() in {Path(b).resolve() for b in bare_figures_in}
        try:
            shown = str(p.resolve().relative_to(ROOT))
        except ValueError:
            shown = str(p)
        r = check_text(p.read_text(encoding="utf-8"), shown, p.resolve().parent, records, bare)
        total.citations += r.citations
        total.problems += r.problems
        total.placeholders += r.placeholders
    return total


def default_doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ---------------------------------------------------------------- command line


def _check_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="records check", description="check the figures the docs quote")
    p.add_argument("files", nargs="*", help="Markdown files (default: README.md docs/*.md)")
    args = p.parse_args(argv)
    files = [Path(f) for f in args.files] or default_doc_files()
    result = check_files(files)
    for line in result.placeholders:
        print(f"placeholder: {line}")
    for line in result.problems:
        print(line, file=sys.stderr)
    print(f"{len(result.citations)} cited figures, {len(result.problems)} problems, "
          f"{len(result.placeholders)} placeholders")
    return 1 if result.problems else 0


def format_figure(value: float) -> str:
    """How ``fill`` prints a figure: integers as they are, fractions below 1 with 3 decimals, other
    numbers with 1 (edit the text afterwards if another precision reads better; ``check`` accepts any
    number of digits that the record rounds to)."""
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}" if abs(value) >= 10000 else str(int(value))
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"


def fill_text(text: str, base_dir: Path) -> tuple[str, list[str], list[str]]:
    """Replace each ``[TODO(...)](record#key)`` whose record now exists by the record's figure.
    Returns (text, filled, still missing)."""
    filled, missing = [], []
    cache: dict = {}

    def replace(m):
        label, target = m.group(1), m.group(2)
        path, _, fragment = target.partition("#")
        if not label.startswith("TODO(") or not _is_record_target(path) or not fragment:
            return m.group(0)
        record_path = (base_dir / path).resolve()
        record = _cached_record(cache, record_path)
        fm = _FRAGMENT.match(fragment)
        key, op, factor = fm.group("key"), fm.group("op"), fm.group("n")
        if isinstance(record, RecordError) or key not in record["figures"]:
            missing.append(f"{target}: {record if isinstance(record, RecordError) else 'no figure ' + repr(key)}")
            return m.group(0)
        value = record["figures"][key]
        if op:
            value = value / float(factor) if op == "/" else value * float(factor)
        filled.append(f"{target} = {format_figure(value)}")
        return f"[{format_figure(value)}]({target})"

    return _LINK.sub(replace, text), filled, missing


def _fill_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="records fill",
                                description="replace [TODO(...)](record#key) placeholders by their records' figures")
    p.add_argument("files", nargs="*", help="Markdown files (default: README.md docs/*.md)")
    args = p.parse_args(argv)
    missing_any = False
    for f in [Path(f) for f in args.files] or default_doc_files():
        text = f.read_text(encoding="utf-8")
        new, filled, missing = fill_text(text, f.resolve().parent)
        if new != text:
            atomic_write_text(f, new)
        for line in filled:
            print(f"{f}: filled {line}")
        for line in missing:
            print(f"{f}: still a placeholder: {line}", file=sys.stderr)
        missing_any = missing_any or bool(missing)
    return 1 if missing_any else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron.emdr2.records",
        description="write docs/results/NAME.json: a record of a measurement (see the module docstring); "
                    "'check' checks the docs' citations",
        usage="%(prog)s --name NAME [--figures-from FILE ...] [--figure KEY=NUMBER ...] [-- COMMAND ...]")
    p.add_argument("--name", required=True, help="the record's name: docs/results/NAME.json")
    p.add_argument("--command", default=None,
                   help="the command that produced the figures (an import: no COMMAND after --)")
    p.add_argument("--figures-from", action="append", default=[], metavar="FILE[:PREFIX]",
                   help="a JSON file whose numbers become figures (flattened; PREFIX. prepended if given); "
                        "read after COMMAND ran")
    p.add_argument("--figure", action="append", default=[], metavar="KEY=NUMBER", help="one figure")
    p.add_argument("--keep", nargs="+", default=None, metavar="PREFIX",
                   help="keep only the figures whose names start with one of these")
    p.add_argument("--note", default=None, help="one line on how to read the record")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="default docs/results")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return _check_main(argv[1:])
    if argv[:1] == ["fill"]:
        return _fill_main(argv[1:])
    command_argv: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command_argv = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    try:
        if command_argv and args.command:
            raise RecordError("give either --command (an import) or a COMMAND after --, not both")
        if not command_argv and not args.command:
            raise RecordError("no command: run one after -- or name the one that ran with --command")
        run = None
        commit = git_state()  # the code that runs, before the command can change the checkout
        if command_argv:
            run = run_command(command_argv)
            if run["exit_status"] != 0:
                raise RecordError(f"the command exited with status {run['exit_status']}: no record written")
        figures: dict = {}
        sources = [split_source(spec) for spec in args.figures_from]
        for path, prefix in sources:
            figures.update(read_figures(path, f"{prefix}." if prefix else ""))
        if args.keep:
            figures = {k: v for k, v in figures.items() if k.startswith(tuple(args.keep))}
        figures.update(parse_figure(f) for f in args.figure)
        if run:  # the wrapped command's own time is a figure too
            figures.setdefault("wall_seconds", run["wall_seconds"])
        record = make_record(args.name, args.command or shlex.join(command_argv), figures,
                             recorded_by="run" if command_argv else "import",
                             sources=[path for path, _ in sources], note=args.note, run=run, commit=commit)
        path = write_record(record, args.out_dir)
    except RecordError as e:
        print(f"records: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
