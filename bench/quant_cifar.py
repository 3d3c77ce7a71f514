"""Quantizing ResNet-20 on CIFAR-10: int8 static PTQ, W4A4 QAT (LSQ), ternary and binary.

Run from the repository root::

    python bench/quant_cifar.py            # the real benchmark (~2.5 h on 2 cores)
    python bench/quant_cifar.py --quick    # smoke run: 1,024 training / 500 test images,
                                           # 1 epoch; writes "-quick" files
    python bench/quant_cifar.py --val      # tuning run on 5,000 held-out training images

The CIFAR-10 here is a JPEG quality-75 copy (shared data README, section 7), so the baseline
is Distiller's ResNet-20 checkpoint fine-tuned briefly on the JPEG training split
(``_cifar_train.run_baseline``, the same as bench/structured_cifar.py), and every quantized
model is compared with that baseline on the JPEG test split in the same run. Arms, each one
``modelpress.compress`` recipe from the baseline:

* ``int8-static``  -- ``quant.int8_static``: int8 weights per output channel, uint8 inputs of
  every Conv2d/Linear from observers calibrated on 1,024 (un-augmented) training images; no
  training. Also run on onnxruntime as a QDQ graph (``modelpress.runtime``) for latency;
* ``int8-static-r7`` -- the same with ``reduce_range`` (7-bit weights), which lets
  onnxruntime use its int8-weight kernels exactly on CPUs without VNNI;
* ``w4a4-qat``     -- ``quant.qat`` (LSQ) with 4-bit weights and 4-bit layer inputs on every
  layer but the first conv and the classifier, which get 8/8 (the usual practice, Esser et
  al. 2020), then ``train`` for the fine-tune budget (SGD, cosine, augmented).
* ``w4a4-qat-kd``  -- the same with ``distill.kd`` before ``train`` (the fp32 baseline as the
  teacher; the technique's defaults, temperature 4 and alpha 0.9, fixed a priori): the
  quantized student learns from the baseline's soft labels as well as the labels.
* ``ternary``, ``binary`` -- ``quant.ternary`` (TWN) / ``quant.binary`` (XNOR-Net weights)
  on the same layers (first conv and classifier kept fp32), then the same ``train``.

Reported per model (reloaded from its artifact): test accuracy and its change in pp against
the baseline, artifact bytes and the ratio to the fp32 state-dict file, and for the baseline
and int8-static the 1-thread latency at batch 1 and 64 in torch eager and onnxruntime (median
of interleaved rounds). Targets: int8 static **<= 0.2 pp** loss; W4A4 QAT **<= 0.5 pp**;
ternary and binary reported.
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
from modelpress.measure import directory_bytes, state_dict_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar_train import (
    Evaluator,
    Splits,
    TrainingSettings,
    load_splits,
    run_baseline,
    to_inputs,
    train_record,
)
from _common import (
    BenchError,
    base_parser,
    data_dir,
    finish,
    in_processes,
    interleaved_latency,
    log,
    main_guard,
    markdown_table,
    result_name,
    run_info,
    run_info_markdown,
    speedup,
)

NAME = "quant_cifar"
ARMS = ("int8-static", "int8-static-r7", "w4a4-qat", "w4a4-qat-kd", "ternary", "binary")
PTQ_ARMS = ("int8-static", "int8-static-r7")
TRAINED_ARMS = ("w4a4-qat", "w4a4-qat-kd", "ternary", "binary")
TARGETS_PP = {
    "int8-static": 0.2,
    "int8-static-r7": 0.2,
    "w4a4-qat": 0.5,
    "w4a4-qat-kd": 0.5,
}  # largest accuracy loss allowed
EDGE_LAYERS = ["conv1", "fc"]  # the first conv and the classifier


@dataclass(frozen=True)
class Settings(TrainingSettings):
    """Every hyperparameter of the benchmark (see bench/README.md)."""

    finetune_epochs: int = 3
    finetune_lr: float = 0.01
    calibration_images: int = 1024
    latency_batches: tuple[int, ...] = (1, 64)
    latency_runs: int = 60
    latency_rounds: int = 6
    latency_warmup: int = 3

    def quick(self) -> Settings:
        """The smoke-run version."""
        return replace(self.quick_data(), calibration_images=256, latency_runs=10,
                       latency_rounds=2)  # fmt: skip


def stages(arm: str, settings: Settings) -> list[dict[str, Any]]:
    """The recipe of ``arm`` as stage dicts."""
    train = {"technique": "train", **settings.train_config("finetune")}
    if arm in PTQ_ARMS:
        return [{"technique": "quant.int8_static", "n_samples": settings.calibration_images,
                 "reduce_range": arm == "int8-static-r7"}]  # fmt: skip
    if arm in ("w4a4-qat", "w4a4-qat-kd"):
        kd = [{"technique": "distill.kd"}] if arm == "w4a4-qat-kd" else []
        return [
            {"technique": "quant.qat", "method": "lsq", "weight_bits": 4,
             "activation_bits": 4, "ignore": EDGE_LAYERS},
            {"technique": "quant.qat", "method": "lsq", "weight_bits": 8,
             "activation_bits": 8, "targets": EDGE_LAYERS},
            *kd,
            train,
        ]  # fmt: skip
    technique = {"ternary": "quant.ternary", "binary": "quant.binary"}[arm]
    return [{"technique": technique, "ignore": EDGE_LAYERS}, train]


def plain_batches(splits: Splits, n: int, batch_size: int) -> list[tuple[torch.Tensor, Any]]:
    """The first ``n`` training images, un-augmented, as ``(inputs, labels)`` batches."""
    x = to_inputs(splits.train_images[:n])
    return list(zip(x.split(batch_size), splits.train_labels[:n].split(batch_size), strict=True))


def run_arm(arm: str, args: argparse.Namespace, settings: Settings, baseline_path: str,
            work: Path) -> dict[str, Any]:  # fmt: skip
    """One arm from the saved baseline (in its own process with --jobs 2)."""
    torch.set_num_threads(args.threads)
    splits = load_splits(data_dir(args.data, require="cifar10"), args.val, settings, args.seed)
    baseline = mp.load(baseline_path).eval()
    ev = Evaluator(splits)
    trained = arm in TRAINED_ARMS
    data = (splits.batches(settings, args.seed) if trained
            else plain_batches(splits, settings.calibration_images, settings.batch_size))  # fmt: skip
    start = time.perf_counter()
    result = mp.compress(baseline, stages(arm, settings), data=data, evaluate=ev,
                         example_inputs=splits.eval_inputs[:1], seed=args.seed,
                         latency_runs=0)  # fmt: skip
    seconds = time.perf_counter() - start
    path = result.save(work / arm)
    record: dict[str, Any] = {
        "recipe": stages(arm, settings),
        "seconds": seconds,
        "correct": ev.correct(mp.load(path).eval()),
        "in_memory_correct": round(result.final["eval"]["accuracy"] * ev.n),
        "before_training_correct": None,
        "artifact": str(path),
        "artifact_bytes": directory_bytes(path),
        "stages": [{"technique": s.technique, "learned": s.learned} for s in result.stages],
    }
    if trained:
        record["before_training_correct"] = round(
            result.stages[-2].metrics["eval"]["accuracy"] * ev.n
        )
        tr = result.stages[-1]
        record["train"] = train_record(settings.train_config("finetune"), tr.seconds,
                                       tr.learned["steps"], tr.learned["final_loss"], data)  # fmt: skip
    log(f"{arm}: {seconds:.0f} s; accuracy {100 * record['correct'] / ev.n:.2f} %")
    return record


def run_arms(arms: list[str], args: argparse.Namespace, settings: Settings, baseline_path: str,
             work: Path) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every arm, in ``--jobs`` spawned processes (fresh torch state each)."""
    return in_processes(run_arm, arms, args, settings, baseline_path, work, jobs=args.jobs)


def latency(baseline: nn.Module, int8_paths: dict[str, str], splits: Splits,
            settings: Settings, work: Path) -> dict[str, Any]:  # fmt: skip
    """1-thread latency of the baseline and the int8 models, torch eager and onnxruntime."""
    from modelpress.runtime import OrtModule, export_onnx
    from modelpress.runtime.artifact import load_quantized

    x = splits.eval_inputs[: max(settings.latency_batches)].contiguous()
    int8 = {arm: load_quantized(path) for arm, path in int8_paths.items()}  # grids back on
    models: dict[str, nn.Module] = {"baseline eager": baseline}
    models |= {f"{arm} eager": model for arm, model in int8.items()}
    for name, model in (("baseline", baseline), *int8.items()):
        onnx = export_onnx(model, x[:2], work / "onnx" / f"{name}.onnx")
        models[f"{name} onnxruntime"] = OrtModule(onnx.path, threads=1)
    return interleaved_latency(models, x, batches=settings.latency_batches,
                               runs=settings.latency_runs, rounds=settings.latency_rounds,
                               warmup=settings.latency_warmup, threads=1)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    d = Settings()
    p = base_parser(__doc__, "cifar10/ and resnet20-cifar10/", "<result name>/<arm>")
    p.add_argument("--val", action="store_true", help="tuning run on 5,000 images held out of "
                   "the training set (test set untouched); writes *-val files")  # fmt: skip
    p.add_argument("--epochs", type=int, help=f"fine-tune epochs of the trained arms "
                   f"(default {d.finetune_epochs}; 1 with --quick)")  # fmt: skip
    p.add_argument("--lr", type=float, help=f"fine-tune peak lr (default {d.finetune_lr})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms "
                   f"(default {','.join(ARMS)})")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="processes for the arms")
    p.add_argument("--tag", help="suffix of the result name, for a run of some arms only "
                   "(writes quant_cifar-TAG.*, leaving the full run's files alone)")  # fmt: skip
    return p.parse_args(argv)


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    root = data_dir(args.data, require="cifar10")
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise BenchError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    splits = load_splits(root, args.val, settings, args.seed)
    work = args.work / result_name(NAME, args)
    ev = Evaluator(splits)
    baseline, base = run_baseline(splits, root, settings, args.seed, work, ev)
    records = run_arms(arms, args, settings, base["artifact"], work)
    lat = {}
    int8_paths = {a: records[a]["artifact"] for a in PTQ_ARMS if a in records}
    if int8_paths:
        log("latency ...")
        lat = latency(baseline, int8_paths, splits, settings, work)
    return {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "evaluation_split": "validation (held-out training images)" if args.val else "test",
        "data": splits.spec,
        "evaluation_images": ev.n,
        "settings": asdict(settings),
        "targets_max_loss_pp": TARGETS_PP,
        "baseline": base | {"state_dict_bytes": state_dict_bytes(baseline)},
        "arms": records,
        "latency_threads_1": lat,
        "seconds": time.perf_counter() - t0,
    }


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The results as Markdown: the table, latency, and the verdicts."""
    n, base = data["evaluation_images"], data["baseline"]
    fp32 = base["state_dict_bytes"]
    rows = [["baseline (fp32)", f"{100 * base['correct'] / n:.2f}", "", f"{fp32:,}", "1.0×", ""]]
    for arm, r in data["arms"].items():
        drop = 100 * (base["correct"] - r["correct"]) / n
        target = TARGETS_PP.get(arm)
        verdict = "report" if target is None else ("met" if drop <= target else "missed")
        rows.append([arm, f"{100 * r['correct'] / n:.2f}", f"{-drop:+.2f}",
                     f"{r['artifact_bytes']:,}", f"{fp32 / r['artifact_bytes']:.1f}×",
                     f"{verdict}" + (f" (≤ {target} pp)" if target else "")])  # fmt: skip
    out = ["# ResNet-20 on CIFAR-10 (JPEG): quantization\n", run_info_markdown(info), "",
           f"Evaluation: {data['evaluation_split']}, {n:,} images; data `{data['data']}`.", "",
           markdown_table(["model", "top-1 %", "Δ pp", "bytes", "vs fp32 file", "target"],
                          rows, "lrrrrl")]  # fmt: skip
    lat = data["latency_threads_1"]
    if lat:
        base = lat["baseline eager"]
        lrows = [[name, *(f"{v[f'b{b}_median_ms']:.3f} ms ({speedup(base, v, b):.2f}×)"
                          for b in (1, 64))] for name, v in lat.items()]  # fmt: skip
        out += [
            "",
            "Latency, 1 thread (speedup vs baseline torch eager):",
            "",
            markdown_table(["model", "batch 1", "batch 64"], lrows, "lrr"),
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write bench/results/quant_cifar{-quick,-val}.{json,md}."""
    args = parse_args(argv)
    settings = Settings().quick() if args.quick else Settings()
    overrides = {"finetune_epochs": args.epochs, "finetune_lr": args.lr}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    info = run_info(__file__, argv, threads={"train": args.threads, "latency": 1})
    data = run(args, settings)
    return finish(result_name(NAME, args), args, info, data, markdown)


if __name__ == "__main__":
    main_guard(main)
