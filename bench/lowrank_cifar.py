"""Tucker-2 and CP factorization of ResNet-20's 3x3 convolutions on CIFAR-10, fine-tuned.

Run from the repository root::

    python bench/lowrank_cifar.py            # the real benchmark (~30 min on 2 cores)
    python bench/lowrank_cifar.py --quick    # smoke run: 1,024 training / 500 test images,
                                             # 1 + 1 epochs; writes "-quick" files
    python bench/lowrank_cifar.py --val      # tuning run on 5,000 held-out training images

The CIFAR-10 here is a JPEG quality-75 copy (shared data README, section 7), so the baseline
is Distiller's ResNet-20 checkpoint fine-tuned briefly on the JPEG training split
(``_cifar_train.run_baseline``, as in bench/structured_cifar.py), and every factorized model
is compared with that baseline on the JPEG test split in the same run. Every arm factorizes
the 3x3 convs of the residual blocks (not the first conv; the 1x1 shortcut convs are skipped
and reported by the techniques themselves), then fine-tunes with the same budget, loop,
optimizer, data order and augmentation:

* ``tucker-vbmf`` -- ``lowrank.tucker`` with the ranks VBMF picks (Kim et al. 2016);
* ``tucker-half`` -- ``lowrank.tucker`` with a ``flops_ratio`` budget on the factorized convs
  chosen so the whole model keeps half its FLOPs;
* ``cp-half``     -- ``lowrank.cp`` (Lebedev et al. 2015) with the same budget, so about the
  same FLOPs as ``tucker-half``.

Reported per model (reloaded from its artifact): test accuracy right after factorizing and
after fine-tuning and its change in pp, FLOPs and the ratio to the baseline's, parameters,
artifact bytes, and latency in torch eager and onnxruntime (fp32 ONNX, checked against eager)
at batch 1 and 64 (median of rounds interleaved with the baseline) as speedups; plus each
technique's per-layer record (ranks, fit error, layer FLOPs and measured layer latency).
The issue sets no numeric target; ours: **<= 1 pp accuracy loss** at half the FLOPs, and the
factorized model **faster than the baseline** in each runtime (speedup > 1 at both batches).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelpress as mp
from modelpress.measure import count_flops, count_params, directory_bytes, state_dict_bytes
from modelpress.techniques.lowrank.layer_cost import layer_input_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar_train import (
    Evaluator,
    TrainingSettings,
    load_splits,
    reuse_note,
    run_baseline,
    train_record,
)
from _common import (
    BenchError,
    base_parser,
    data_dir,
    finish,
    in_processes,
    log,
    main_guard,
    markdown_table,
    result_name,
    run_info,
    run_info_markdown,
    speedup,
)
from _onnx import eager_and_ort_latency, exporter_name

NAME = "lowrank_cifar"
ARMS = ("tucker-vbmf", "tucker-half", "cp-half")
LONGEST_FIRST = ("cp-half", "tucker-half", "tucker-vbmf")  # order handed to the processes
MODEL_FLOPS_KEEP = 0.5  # the -half arms keep this fraction of the whole model's FLOPs
TARGET_DROP_PP = 1.0
FIRST_CONV = "conv1"


@dataclass(frozen=True)
class Settings(TrainingSettings):
    """Every hyperparameter of the benchmark (see bench/README.md)."""

    finetune_epochs: int = 2
    finetune_lr: float = 0.02
    cp_iterations: int = 100
    latency_threads: tuple[int, ...] = (1, 2)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_runs: int = 100
    latency_rounds: int = 10
    latency_warmup: int = 3

    def quick(self) -> Settings:
        """The smoke-run version."""
        return replace(self.quick_data(), cp_iterations=20, latency_threads=(1,),
                       latency_runs=20, latency_rounds=2)  # fmt: skip


def factorized_convs(model: nn.Module) -> list[str]:
    """The k×k (k > 1), ungrouped convs the arms factorize: all but the first conv."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != FIRST_CONV
            and m.groups == 1 and m.kernel_size != (1, 1)]  # fmt: skip


def convs_flops_ratio(baseline: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """The ``flops_ratio`` of the factorized convs that leaves the model at
    :data:`MODEL_FLOPS_KEEP` of its FLOPs (the rest of the model is not factorized)."""
    names = factorized_convs(baseline)
    shapes = layer_input_shapes(baseline, names, example)
    convs = sum(count_flops(baseline.get_submodule(n), torch.zeros(shapes[n])) for n in names)
    total = count_flops(baseline, example)
    ratio = (MODEL_FLOPS_KEEP * total - (total - convs)) / convs
    return {"flops_ratio": ratio, "model_flops": total, "factorized_conv_flops": convs}


def stages(arm: str, settings: Settings, ratio: float) -> list[dict[str, Any]]:
    """The recipe of ``arm`` as stage dicts."""
    train = {"technique": "train", **settings.train_config("finetune")}
    factor: dict[str, Any] = {"technique": "lowrank.cp" if arm.startswith("cp") else
                              "lowrank.tucker", "ignore": [FIRST_CONV]}  # fmt: skip
    if arm.endswith("half"):
        factor["flops_ratio"] = round(ratio, 6)
    if arm.startswith("cp"):
        factor["n_iter"] = settings.cp_iterations
    return [factor, train]


def run_arm(arm: str, args: argparse.Namespace, settings: Settings, baseline_path: str,
            ratio: float, work: Path) -> dict[str, Any]:  # fmt: skip
    """One arm from the saved baseline (in its own process with --jobs 2)."""
    torch.set_num_threads(args.threads)
    splits = load_splits(data_dir(args.data, require="cifar10"), args.val, settings, args.seed)
    baseline = mp.load(baseline_path).eval()
    ev = Evaluator(splits)
    batches = splits.batches(settings, args.seed)
    recipe = stages(arm, settings, ratio)
    start = time.perf_counter()
    result = mp.compress(baseline, recipe, data=batches, evaluate=ev, latency_runs=0,
                         example_inputs=splits.eval_inputs[:1], seed=args.seed)  # fmt: skip
    seconds = time.perf_counter() - start
    path = result.save(work / arm)
    factor, train = result.stages
    record = {
        "recipe": recipe,
        "seconds": seconds,
        "factorize_seconds": factor.seconds,
        "factorized_correct": round(factor.metrics["eval"]["accuracy"] * ev.n),
        "learned": factor.learned,
        "train": train_record(settings.train_config("finetune"), train.seconds,
                              train.learned["steps"], train.learned["final_loss"], batches),
        "correct": ev.correct(mp.load(path).eval()),
        "in_memory_correct": round(result.final["eval"]["accuracy"] * ev.n),
        "artifact": str(path),
        "artifact_bytes": directory_bytes(path),
    }  # fmt: skip
    log(f"{arm}: {seconds:.0f} s; accuracy {100 * record['factorized_correct'] / ev.n:.2f} % "
        f"after factorizing, {100 * record['correct'] / ev.n:.2f} % after fine-tuning")  # fmt: skip
    return record


def run_arms(arms: list[str], args: argparse.Namespace, settings: Settings, baseline_path: str,
             ratio: float, work: Path) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every arm, in ``--jobs`` spawned processes, the longest first."""
    order = [a for a in LONGEST_FIRST if a in arms]
    done = in_processes(run_arm, order, args, settings, baseline_path, ratio, work,
                        jobs=args.jobs)  # fmt: skip
    return {a: done[a] for a in arms}


def measure_models(baseline: nn.Module, records: dict[str, dict[str, Any]], x: torch.Tensor,
                   settings: Settings, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Params, FLOPs and bytes of every model, and their interleaved eager/ORT latency."""
    models = {"baseline": baseline}
    models |= {arm: mp.load(r["artifact"]).eval() for arm, r in records.items()}
    latency, exports = eager_and_ort_latency(
        models, x[: max(settings.latency_batches)].contiguous(), work / "onnx",
        threads=settings.latency_threads, batches=settings.latency_batches,
        runs=settings.latency_runs, rounds=settings.latency_rounds, warmup=settings.latency_warmup,
    )  # fmt: skip
    rows = {name: {"params": count_params(m), "flops": count_flops(m, x[:1]),
                   "state_dict_bytes": state_dict_bytes(m), "onnx": exports[name]}
            for name, m in models.items()}  # fmt: skip
    return rows, latency


def add_ratios(data: dict[str, Any]) -> None:
    """Accuracy, Δ pp, FLOPs/params/bytes ratios, speedups and the verdict of every model."""
    n, models = data["evaluation_images"], data["models"]
    base = models["baseline"]
    for name, m in models.items():
        m["flops_kept"] = m["flops"] / base["flops"]
        m["flops_ratio"] = base["flops"] / m["flops"]
        m["params_ratio"] = base["params"] / m["params"]
        m["bytes_ratio"] = base["artifact_bytes"] / m["artifact_bytes"]
        m["accuracy_pct"] = 100 * m["correct"] / n
        m["delta_pp"] = 100 * (m["correct"] - base["correct"]) / n
        m["speedup"] = {
            threads: {f"{rt}_b{b}": speedup(per["baseline"][rt], e, b)
                      for rt, e in per[name].items() for b in data["settings"]["latency_batches"]}
            for threads, per in data["latency"].items()
        }  # fmt: skip
        if name != "baseline":
            m["verdict"] = verdict(
                m, m["speedup"][f"threads_{data['settings']['latency_threads'][0]}"]
            )


def verdict(m: dict[str, Any], speedups: dict[str, float]) -> dict[str, Any]:
    """Accuracy within :data:`TARGET_DROP_PP` and faster than the baseline, per runtime."""
    out: dict[str, Any] = {"accuracy_ok": m["delta_pp"] >= -TARGET_DROP_PP - 1e-9}
    for rt in ("eager", "ort"):
        slow = {k: v for k, v in speedups.items() if k.startswith(rt) and v <= 1.0}
        out[f"{rt}_faster"] = not slow
        out[f"{rt}_not_faster"] = slow
    out["met"] = out["accuracy_ok"] and out["eager_faster"] and out["ort_faster"]
    return out


def run(args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    root = data_dir(args.data, require="cifar10")
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise BenchError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    splits = load_splits(root, args.val, settings, args.seed)
    work = args.work / name
    ev = Evaluator(splits)
    baseline, base = run_baseline(splits, root, settings, args.seed, work, ev)
    budget = convs_flops_ratio(baseline, splits.eval_inputs[:1])
    log(f"budget: flops_ratio {budget['flops_ratio']:.4f} of the factorized convs")
    records = run_arms(arms, args, settings, base["artifact"], budget["flops_ratio"], work)
    log("latency ...")
    t_lat = time.perf_counter()
    rows, latency = measure_models(baseline, records, splits.eval_inputs, settings, work)
    rows["baseline"] |= base
    for arm, r in records.items():
        rows[arm] |= r
    data = {
        "benchmark": NAME, "mode": "quick" if args.quick else "full",
        "evaluation_split": "validation (held-out training images)" if args.val else "test",
        "data": splits.spec, "train_images": len(splits.train_labels),
        "evaluation_images": ev.n, "settings": asdict(settings), "budget": budget,
        "target": {"max_accuracy_drop_pp": TARGET_DROP_PP, "min_speedup_exclusive": 1.0,
                   "model_flops_kept": MODEL_FLOPS_KEEP},
        "onnx": {"exporter": exporter_name(), "provider": "CPUExecutionProvider",
                 "graph_optimization": "ORT_ENABLE_ALL"},
        "models": rows, "latency": latency, "latency_seconds": time.perf_counter() - t_lat,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    add_ratios(data)
    return data


# --------------------------------------------------------------------------- report


def _x(v: float) -> str:
    return f"{v:.2f}×"


def _results_table(data: dict[str, Any], threads: str) -> str:
    rows = []
    for name, m in data["models"].items():
        sp = m["speedup"][threads]
        met = "—" if "verdict" not in m else ("**yes**" if m["verdict"]["met"] else "no")
        delta = "—" if name == "baseline" else f"{m['delta_pp']:+.2f}"
        rows.append([name, f"{m['accuracy_pct']:.2f}", delta, f"{m['params']:,}",
                     f"{m['flops'] / 1e6:.1f}", f"{m['flops_kept']:.3f} ({_x(m['flops_ratio'])})",
                     f"{m['artifact_bytes']:,}", _x(sp["eager_b1"]), _x(sp["eager_b64"]),
                     _x(sp["ort_b1"]), _x(sp["ort_b64"]), met])  # fmt: skip
    split = "test" if data["evaluation_split"] == "test" else "val"
    headers = [
        "model", f"{split} accuracy %", "Δ pp", "params", "MFLOPs", "FLOPs kept (ratio)",
        "artifact bytes", "eager b1", "eager b64", "ORT b1", "ORT b64", "target met",
    ]  # fmt: skip
    return markdown_table(headers, rows, align="lrrrrrrrrrrc")


def _latency_table(data: dict[str, Any], threads: str) -> str:
    rows = []
    for name, per in data["latency"][threads].items():
        rows.append([name, *(f"{per[rt][f'b{b}_median_ms']:.2f}" for rt in ("eager", "ort")
                             for b in data["settings"]["latency_batches"])])  # fmt: skip
    bs = data["settings"]["latency_batches"]
    return markdown_table(["model", *[f"{r} b{b} ms" for r in ("eager", "ORT") for b in bs]],
                          rows, align="lrrrr")  # fmt: skip


def _arms_table(data: dict[str, Any]) -> str:
    n, rows = data["evaluation_images"], []
    for name, m in data["models"].items():
        if name == "baseline":
            continue
        layers = m["learned"]["layers"].values()
        fit = [r["fit_error"] for r in layers]
        ranks = "/".join(str(r["rank"]) if "rank" in r else f"{r['rank_in']}-{r['rank_out']}"
                         for r in layers)  # fmt: skip
        layer_speed = [r["speedup"] for r in layers if "speedup" in r]
        rows.append([name, f"{100 * m['factorized_correct'] / n:.2f}", f"{m['accuracy_pct']:.2f}",
                     f"{sum(fit) / len(fit):.3f} ({min(fit):.3f}–{max(fit):.3f})",
                     f"{len(m['learned'].get('slower', []))} / {len(layer_speed)}",
                     f"{m['factorize_seconds']:.0f}", f"{m['train']['seconds']:.0f}", ranks])  # fmt: skip
    headers = ["arm", "accuracy after factorizing %", "after fine-tune %",
               "fit error mean (min–max)", "layers slower (1-thread layer timing)",
               "factorize s", "fine-tune s", "ranks per conv (in order)"]  # fmt: skip
    return markdown_table(headers, rows, align="lrrrrrrl")


def _verdict_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for name, m in data["models"].items():
        if "verdict" not in m:
            continue
        v = m["verdict"]
        bits = [f"{m['delta_pp']:+.2f} pp ({'ok' if v['accuracy_ok'] else 'too much'}) at "
                f"{m['flops_kept']:.3f} of the FLOPs"]  # fmt: skip
        for rt, label in (("eager", "eager"), ("ort", "ORT")):
            slow = ", ".join(f"{k.split('_')[1]} {_x(x)}" for k, x in v[f"{rt}_not_faster"].items())
            bits.append(f"{label} {'faster' if not slow else 'not faster: ' + slow}")
        lines.append(f"- **{name}: {'met' if v['met'] else 'not met'}** — " + "; ".join(bits))
    return lines


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report."""
    s, base, n = data["settings"], data["models"]["baseline"], data["evaluation_images"]
    title = "# ResNet-20 on CIFAR-10 (JPEG): Tucker-2 and CP factorization, fine-tuned"
    title += " (quick smoke run)" if data["mode"] == "quick" else ""
    title += " — validation run (for tuning)" if data["evaluation_split"] != "test" else ""
    threads = [f"threads_{t}" for t in s["latency_threads"]]
    parts = [
        title,
        f"Target (ours; the issue sets none): **≤ {TARGET_DROP_PP} pp accuracy loss** after the "
        "fine-tune, and **faster than the baseline** (speedup > 1 at batch 1 and 64) in each "
        f"runtime at {s['latency_threads'][0]} thread; the `-half` arms keep "
        f"{MODEL_FLOPS_KEEP} of the model's FLOPs (`flops_ratio` "
        f"{data['budget']['flops_ratio']:.4f} of the factorized convs).",
        "\n".join(_verdict_lines(data)),
    ]
    for t in threads:
        parts += [f"## Results, speedups at {t.removeprefix('threads_')} thread(s)",
                  _results_table(data, t)]  # fmt: skip
    for t in threads:
        parts += [f"### Latency at {t.removeprefix('threads_')} thread(s), median ms",
                  _latency_table(data, t)]  # fmt: skip
    bt = base["train"]
    parts += [
        "## Arms",
        _arms_table(data),
        f"Baseline: Distiller's ResNet-20 checkpoint ({100 * base['checkpoint_correct'] / n:.2f} % "
        f"on this split before fine-tuning) fine-tuned {bt['epochs']} epoch(s) on "
        f"{data['train_images']:,} JPEG training images (SGD, lr {bt['lr']}, cosine)"
        f"{reuse_note(base)}. Every arm "
        f"factorizes the 3x3 convs of the residual blocks (not `{FIRST_CONV}`) and fine-tunes "
        f"{s['finetune_epochs']} epoch(s) (SGD momentum {s['momentum']}, lr {s['finetune_lr']}, "
        f"cosine, weight decay {s['weight_decay']}, batch {s['batch_size']}) on the same "
        "augmented batches. CP-ALS runs "
        f"{s['cp_iterations']} iterations (tensorly `parafac`, SVD start, seeded). FLOPs: "
        "`modelpress.measure.count_flops` (2 per multiply-accumulate). Latency: torch eager and "
        "onnxruntime (fp32 ONNX, checked against eager) in rounds interleaving every model and "
        f"runtime ({s['latency_runs']} runs in {s['latency_rounds']} rounds); speedup = "
        "the median over rounds of the baseline's round median / the model's (paired). "
        "Artifact bytes: the whole artifact directory.",
        "## Run",
        run_info_markdown(info),
    ]
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    d = Settings()
    p = base_parser(__doc__, "cifar10/ and resnet20-cifar10/", "<result name>/<arm>")
    p.add_argument("--val", action="store_true", help="tuning run on 5,000 images held out of "
                   "the training set (test set untouched); writes *-val files")  # fmt: skip
    p.add_argument("--epochs", type=int, help=f"fine-tune epochs of every arm (default "
                   f"{d.finetune_epochs}; 1 with --quick)")  # fmt: skip
    p.add_argument("--lr", type=float, help=f"fine-tune peak lr (default {d.finetune_lr})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms "
                   f"(default {','.join(ARMS)})")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="processes for the arms")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write bench/results/lowrank_cifar{-val}{-quick}.{json,md}."""
    args = parse_args(argv)
    settings = Settings().quick() if args.quick else Settings()
    overrides = {"finetune_epochs": args.epochs, "finetune_lr": args.lr}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    name = result_name(NAME, args)
    info = run_info(__file__, argv,
                    threads={"train": args.threads, "processes": args.jobs,
                             **{f"latency_{t}": t for t in settings.latency_threads}})  # fmt: skip
    data = run(args, settings, name)
    return finish(name, args, info, data, markdown, "\n\n## Arms")


if __name__ == "__main__":
    main_guard(main)
