"""What every benchmark shares: where the data is, what machine ran it, and writing results.

A benchmark calls :func:`run_info` at the start, does its work, and hands its numbers and a
Markdown summary to :func:`write_results`, which writes ``<out>/<name>.json`` and
``<out>/<name>.md`` (each to a temporary file first, then renamed into place). A bad input
(a missing data folder) is a :class:`BenchError`; :func:`main_guard` turns it into one line on
stderr and exit code 2, as the ``modelpress`` CLI does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import modelpress
from modelpress.errors import ModelpressError
from modelpress.measure import accuracy, measure_latency

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "bench" / "work"  # artifacts written by benchmarks; git-ignored


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (missing data, bad option); the message is one line."""


def data_dir(arg: str | os.PathLike[str] | None, require: str | None = None) -> Path:
    """The data directory: ``arg``, else ``$MODELPRESS_DATA``, else ``<repo>/../shared/data``.

    Args:
        arg: the ``--data`` option as given (``None`` when not given); ``~`` is expanded.
        require: a sub-folder the benchmark reads (e.g. ``"mnist"``) that must exist too.

    Returns:
        The resolved, existing directory.

    Raises:
        BenchError: the directory (or ``require`` inside it) does not exist.
    """
    if arg:
        where, root = "--data", Path(arg).expanduser()
    elif os.environ.get("MODELPRESS_DATA"):
        where, root = "$MODELPRESS_DATA", Path(os.environ["MODELPRESS_DATA"]).expanduser()
    else:
        where, root = "the default (<repo>/../shared/data)", REPO_ROOT.parent / "shared" / "data"
    root = root.resolve()
    if not root.is_dir():
        raise BenchError(
            f"data directory {root} (from {where}) does not exist; pass --data DIR or set "
            "MODELPRESS_DATA."
        )
    if require and not (root / require).is_dir():
        raise BenchError(
            f"{root / require} does not exist; the data directory {root} (from {where}) must "
            f"hold a '{require}' folder."
        )
    return root


def git_commit() -> str:
    """``git rev-parse HEAD`` of the repository, plus ``-dirty`` if ``git status`` shows changes
    outside ``bench/results/`` (result files rewritten by an earlier run change no code).

    Returns ``"unknown"`` when git or the repository is not available.
    """
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip()


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(argv: Sequence[str]) -> str:
    """The command as typed from the repo root: ``python bench/x.py --opt ...`` (shell-quoted)."""
    script, *rest = argv
    path = Path(script).resolve()
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    return shlex.join(["python", str(shown), *rest])


def base_parser(
    doc: str, holds: str, work_layout: str, seed_help: str = "everything random"
) -> argparse.ArgumentParser:
    """The options every benchmark has: --data, --out, --work, --seed and --quick.

    Args:
        doc: the benchmark module's docstring (its first paragraph is the description).
        holds: what the data directory must hold, e.g. ``mnist/``.
        work_layout: where under ``<work>`` the artifacts go, e.g. ``<result name>/<arm>``.
        seed_help: what the seed seeds.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--data", help=f"data directory holding {holds} (default: $MODELPRESS_DATA, "
                   "else ../shared/data next to the repository)")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder "
                   "(default: bench/results)")  # fmt: skip
    p.add_argument("--work", type=Path, default=WORK_DIR, help="where the artifacts are "
                   f"written, in <work>/{work_layout} (default: bench/work)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help=f"seed of {seed_help} (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke run; writes *-quick files")
    return p


def run_info(
    script: str, argv: Sequence[str] | None, *, threads: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run metadata every result file records: command, commit, date and machine.

    Args:
        script: the benchmark's file (its ``__file__``), shown as ``python bench/x.py``.
        argv: the arguments its ``main`` was given; None means the command line's
            (``sys.argv[1:]``), so a programmatic ``main([...])`` records what it ran.
        threads: the torch thread counts the benchmark uses, e.g. ``{"train": 2, "latency": 1}``.

    Returns:
        A JSON-ready dict.
    """
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "command": command_line([script, *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": affinity,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "modelpress": modelpress.__version__,
            "threads": dict(threads or {}),
        },
    }


def run_info_markdown(info: dict[str, Any]) -> str:
    """The run metadata as a short Markdown list."""
    m = info["machine"]
    threads = ", ".join(f"{k} {v}" for k, v in m["threads"].items()) or "default"
    lines = [
        f"- command: `{info['command']}`",
        f"- commit: `{info['git_commit']}`",
        f"- date: {info['date']}",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['cpus_usable']} usable), "
        f"{m['platform']}",
        f"- software: Python {m['python']}, torch {m['torch']}, modelpress {m['modelpress']}",
        f"- torch threads: {threads}",
    ]
    if "seed" in info:
        lines.append(f"- seed: {info['seed']}")
    if "seconds" in info:
        lines.append(f"- wall time: {info['seconds']:.0f} s")
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table; ``align`` holds one of ``l``/``r``/``c`` per column (default l)."""
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    align = align.ljust(len(headers), "l")
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_results(
    name: str, data: dict[str, Any], markdown: str, out_dir: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``, each atomically.

    Args:
        name: the result name, e.g. ``"lenet_mnist"`` or ``"lenet_mnist-quick"``.
        data: JSON-ready results (run metadata included by the caller); NaN is rejected.
        markdown: the Markdown report.
        out_dir: the results folder; created if missing.

    Returns:
        The two paths written.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    _write_atomic(json_path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    _write_atomic(md_path, markdown.rstrip() + "\n")
    return json_path, md_path


def result_name(name: str, args: argparse.Namespace) -> str:
    """``name`` plus ``-val``, ``-quick`` and ``-TAG`` as the run's options ask (a benchmark
    without ``--val`` or ``--tag`` simply has no such files)."""
    val = "-val" if getattr(args, "val", False) else ""
    tag = f"-{args.tag}" if getattr(args, "tag", None) else ""
    return name + val + ("-quick" if args.quick else "") + tag


def finish(
    name: str,
    args: argparse.Namespace,
    info: dict[str, Any],
    data: dict[str, Any],
    markdown: Callable[[dict[str, Any], dict[str, Any]], str],
    summary_end: str | None = None,
) -> int:
    """The end of every benchmark's ``main``: record the seed and wall time in ``info``, write
    ``<args.out>/<name>.{json,md}`` (the JSON is ``{"run": info, **data}``), print the
    Markdown's summary (all before ``summary_end``, if given) and log the paths.

    Returns:
        0, the exit code.
    """
    info |= {"seed": args.seed, "seconds": data["seconds"]}
    md = markdown(data, info)
    json_path, md_path = write_results(name, {"run": info, **data}, md, args.out)
    if summary_end is not None:
        print(md.split(summary_end)[0])
    log(f"wrote {json_path} and {md_path} in {data['seconds']:.0f} s")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main_guard(main: Callable[[list[str] | None], int]) -> None:
    """Run ``main`` and exit with its code; bad input is one line on stderr and exit code 2."""
    try:
        code = main(None)
    except (BenchError, ModelpressError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted; no results written.", file=sys.stderr)
        code = 130
    sys.exit(code)


def adam(epochs: int, lr: float) -> dict[str, Any]:
    """``train`` settings the MNIST benchmarks share: Adam, cosine schedule, batch 128."""
    return dict(epochs=epochs, lr=lr, optimizer="adam", schedule="cosine", batch_size=128)


VAL_SIZE, VAL_SPLIT_SEED = 5_000, 20_240_601  # --val: a fixed split, independent of --seed


def log(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


def mnist_bundle(
    root: Path, *, val: bool, train_samples: int | None, seed: int
) -> modelpress.DataBundle:
    """MNIST as a bundle; with ``val`` its test split is 5,000 held-out *training* images
    (the same fixed split for every benchmark); ``train_samples`` keeps a seeded subset."""
    bundle = modelpress.load_data(f"mnist:{root / 'mnist'}")
    train, test, spec = bundle.train, bundle.test, bundle.spec
    if val:
        x, y = train.tensors
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        hold, keep = order[:VAL_SIZE], order[VAL_SIZE:]
        train, test = TensorDataset(x[keep], y[keep]), TensorDataset(x[hold], y[hold])
        spec += f" (validation: {VAL_SIZE} training images held out)"
    if train_samples is not None:
        x, y = train.tensors
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        train = TensorDataset(x[pick[:train_samples]], y[pick[:train_samples]])
        spec += f" (subset: {train_samples} training images)"
    return modelpress.DataBundle(spec, train, test, bundle.num_classes, bundle.input_shape)


def error_pct(model: torch.nn.Module, bundle: modelpress.DataBundle) -> tuple[float, float, int]:
    """``(accuracy, error %, wrong predictions)`` on the bundle's test split."""
    acc = accuracy(model, bundle.loader("test", batch_size=1000))
    n = len(bundle.test)
    wrong = n - round(acc * n)
    return acc, 100.0 * wrong / n, wrong


def interleaved_latency(
    models: dict[str, torch.nn.Module],
    x: torch.Tensor,
    *,
    batches: Sequence[int],
    runs: int,
    rounds: int,
    warmup: int,
    threads: int,
) -> dict[str, dict[str, Any]]:
    """Forward latency (ms) of each model at each batch size, timed in interleaved rounds.

    For each batch size in turn, ``runs`` timed runs are split into ``rounds`` rounds and every
    round times each model in turn (``warmup`` untimed runs, then ``runs // rounds`` timed), so
    background load on the machine hits all models alike; a round holds one batch size only,
    which keeps batch-1 rounds short (many short rounds pair best: a slow phase of the machine
    that covers a whole round cancels out of that round's ratios). Each model runs its
    ``warmup`` and timed runs back to back, so it is timed with warm caches, as it would run
    alone. Reported per model and batch size ``b``:
    ``b{b}_median_ms`` (the median of the round medians), the lowest and highest round medians,
    and ``b{b}_round_ms`` (every round's median, in order, for paired ratios between models:
    :func:`speedup`).
    """
    per_round = max(runs // rounds, 1)
    medians: dict[tuple[str, int], list[float]] = {}
    for batch in batches:
        for _ in range(rounds):
            for name, model in models.items():
                lat = measure_latency(
                    model, x[:batch], runs=per_round, warmup=warmup, threads=threads
                )
                medians.setdefault((name, batch), []).append(lat.median_ms)
    out: dict[str, dict[str, Any]] = {name: {} for name in models}
    for (name, batch), values in medians.items():
        t = torch.tensor(values, dtype=torch.float64)
        out[name] |= {
            f"b{batch}_median_ms": float(t.median()),
            f"b{batch}_min_round_ms": float(t.min()),
            f"b{batch}_max_round_ms": float(t.max()),
            f"b{batch}_round_ms": [round(v, 4) for v in values],
        }
    return out


def speedup(reference: dict[str, Any], model: dict[str, Any], batch: int | str) -> float:
    """How many times faster ``model`` ran than ``reference`` at batch size ``batch``, from two
    :func:`interleaved_latency` entries: the median over rounds of the per-round ratio of
    their round medians (paired: a slow stretch of the machine that covers a round cancels
    out), or the ratio of the medians for entries written before rounds were kept."""
    rounds, median = f"b{batch}_round_ms", f"b{batch}_median_ms"
    if rounds in reference and rounds in model:
        return median_ratio(reference[rounds], model[rounds])
    return reference[median] / model[median]


def median_ratio(reference: Sequence[float], model: Sequence[float]) -> float:
    """``median_r(reference[r] / model[r])``: a paired speedup from per-round times of two
    models measured side by side in the same rounds."""
    ratios = torch.tensor(reference, dtype=torch.float64) / torch.tensor(model, dtype=torch.float64)
    return float(ratios.median())


def in_processes(
    fn: Callable[..., Any], keys: Sequence[Hashable], *args: Any, jobs: int
) -> dict[Any, Any]:
    """``{k: fn(k, *args) for k in keys}``, in ``jobs`` spawned processes (each with a fresh
    torch state; ``fn`` sets its own threads and seeds) when ``jobs`` > 1 and there is more than
    one key, else in this process. Work is submitted in the order of ``keys``."""
    if jobs == 1 or len(keys) == 1:
        return {k: fn(k, *args) for k in keys}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {k: pool.submit(fn, k, *args) for k in keys}
        return {k: futures[k].result() for k in keys}
