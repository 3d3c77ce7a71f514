"""Early exit (BranchyNet) on LeNet-5 / MNIST: accuracy and batch-1 CPU latency against the
same network without exits.

Run from the repository root::

    python bench/early_exit_mnist.py            # the real benchmark
    python bench/early_exit_mnist.py --quick    # smoke run: fewer images, epochs and timings
    python bench/early_exit_mnist.py --val      # tuning run: the test set is replaced by 5,000
                                                # images held out of the training set

Two networks start from the same seeded ``zoo:lenet5`` initialisation and train for the same
epochs: the baseline alone, and the same network with an exit head after its first
convolution (``early_exit.branches``, as in BranchyNet's B-LeNet), trained jointly through
``modelpress.compress``. The technique holds 10 % of its training images out to calibrate the
exit's entropy threshold so that the cascade keeps the final exit's accuracy there. Measured
in one run on one machine: test accuracy of both, the fraction of test images leaving at each
exit, the mean batch-1 latency per image over the test images (torch eager, 1 thread, the two
models timed in alternating rounds) and batch-64 throughput. The target is a mean latency
>= 5x lower at an accuracy >= the baseline's (BranchyNet: 5.4x on CPU).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelpress as mp
from modelpress.measure import accuracy
from modelpress.runtime import OrtModule, export_onnx
from modelpress.techniques.early_exit import EarlyExitModel, exit_statistics
from modelpress.train import train_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    base_parser,
    data_dir,
    finish,
    log,
    main_guard,
    markdown_table,
    median_ratio,
    mnist_bundle,
    result_name,
    run_info,
    run_info_markdown,
)

NAME = "early_exit_mnist"
MODEL_SPEC = "zoo:lenet5"
TARGET_SPEEDUP = 5.0  # x lower mean batch-1 latency, at accuracy >= the baseline's
TRAIN_THREADS, LATENCY_THREADS = 1, 1

TUNING_NOTE = (
    "On the validation split only (55,000 training images, 5,000 held out as the evaluation "
    "set, 10 epochs, seed 0; the test set was used only for this report). The exit goes "
    "after `conv1`, as in BranchyNet's B-LeNet (any later exit skips less of the network). "
    "Head sweep, cascade accuracy / share of images leaving at `conv1` (baseline 99.24 %): "
    "pool 2 + hidden 64: 98.92 % / 13.6 %; pool 4 + hidden 64: 99.12 % / 82.5 %; pool 4 + "
    "hidden 128: 98.88 % / 79.0 %; pool 4 + hidden 64 with loss weights [2, 1]: 99.08 % / "
    "70.4 %; pool 6 + hidden 64: 98.98 % / 83.5 %; pool 8 + hidden 64: 99.10 % / 86.8 %. "
    "Pool 8 + hidden 64 lets the most images leave at about the same accuracy, so it was "
    "kept (latencies in that sweep were too noisy on the shared machine to rank by)."
)


@dataclass(frozen=True)
class Settings:
    """Every hyperparameter of the benchmark (chosen on ``--val``, see ``TUNING_NOTE``)."""

    train_samples: int | None = None  # None: all training images
    train: dict[str, Any] = field(
        default_factory=lambda: dict(
            epochs=10, lr=2e-3, optimizer="adam", schedule="cosine", batch_size=128
        )
    )
    exits: dict[str, Any] = field(
        default_factory=lambda: dict(
            exits=["conv1"], pool=8, hidden=64, criterion="entropy", max_accuracy_drop=0.0
        )
    )
    latency_samples: int | None = None  # batch-1 timing over this many test images (all)
    latency_rounds: int = 5  # rounds over every image; the median is reported
    latency_block: int = 50  # images per paired block (every model runs them in turn)
    throughput_rounds: int = 5
    warmup: int = 200  # untimed batch-1 forwards per model before timing

    def quick(self) -> Settings:
        """The smoke-run version: 5,000 training images, 1 epoch, 500 timed images."""
        return replace(
            self,
            train_samples=5_000,
            train={**self.train, "epochs": 1},
            latency_samples=500,
            latency_rounds=3,
            throughput_rounds=3,
            warmup=20,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    p = base_parser(__doc__, "mnist/", "<result name>/early_exit")
    p.add_argument("--val", action="store_true", help="tuning run on a validation split carved "
                   "from the training set (test set untouched); writes *-val files")  # fmt: skip
    return p.parse_args(argv)


# --------------------------------------------------------------------------- training


def fresh_lenet(bundle: mp.DataBundle, seed: int) -> nn.Module:
    """``zoo:lenet5`` with seeded initial weights (the same for both arms)."""
    torch.manual_seed(seed)
    return mp.load_model(MODEL_SPEC, input_shape=bundle.input_shape, num_classes=10)


def train_early_exit(
    bundle: mp.DataBundle, settings: Settings, seed: int
) -> tuple[EarlyExitModel, mp.Result]:
    """The same initial LeNet-5 with exits, trained jointly for the same epochs."""
    recipe = mp.Recipe(
        stages=(
            mp.Stage.of("early_exit.branches", **settings.exits),
            mp.Stage.of("train", **settings.train),
        ),
        name="lenet5-early-exit",
    )
    result = mp.compress(fresh_lenet(bundle, seed), recipe, data=bundle, seed=seed,
                         latency_runs=0)  # fmt: skip
    return result.model, result


def accuracy_of(model: nn.Module, bundle: mp.DataBundle) -> float:
    """Top-1 accuracy on the evaluation split (batches of 1,000)."""
    return accuracy(model, bundle.loader("test", batch_size=1000))


# --------------------------------------------------------------------------- timing


@torch.inference_mode()
def batch1_latency(
    models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int, block: int
) -> dict[str, dict[str, Any]]:
    """Mean batch-1 latency per image (total time / images) of every model over every image of
    ``x``, in paired blocks: each block of ``block`` images runs through every model in turn
    (the order rotating from block to block and round to round), so a burst of load from
    elsewhere on the machine lands on all models alike instead of on one model's round.

    Returns, per model: ``mean_us`` (the median round's mean), every round's mean, the
    median per-image time, ``speedup_vs_first`` (the median over rounds of the first model's
    round mean over this model's: a paired ratio), and for an early-exit model the mean time
    of the images leaving at each exit.
    """
    rows = list(x.split(1))
    names = list(models)
    for model in models.values():
        model.eval()
        for row in rows[:warmup]:
            model(row)
    totals = {n: torch.zeros(rounds, dtype=torch.float64) for n in names}
    times = {n: torch.empty(len(rows), dtype=torch.float64) for n in names}
    used = {n: torch.empty(len(rows), dtype=torch.long) for n in names}
    clock = time.perf_counter_ns
    for r in range(rounds):
        for b, lo in enumerate(range(0, len(rows), block)):
            shift = (b + r) % len(names)
            for name in names[shift:] + names[:shift]:
                model, t, u = models[name], times[name], used[name]
                early = isinstance(model, EarlyExitModel)
                for i in range(lo, min(lo + block, len(rows))):
                    start = clock()
                    model(rows[i])
                    t[i] = clock() - start
                    if early:
                        u[i] = model.last_exit_index[0]
        for name in names:
            totals[name][r] = times[name].sum() / 1e3 / len(rows)  # us per image
    out: dict[str, dict[str, Any]] = {}
    first = totals[names[0]]
    for name, model in models.items():
        out[name] = {
            "mean_us": float(totals[name].median()),
            "round_means_us": [round(v, 2) for v in totals[name].tolist()],
            "median_image_us": float(times[name].median() / 1e3),
            "speedup_vs_first": median_ratio(first.tolist(), totals[name].tolist()),
        }
        if isinstance(model, EarlyExitModel):
            out[name]["mean_us_by_exit"] = [
                float(times[name][used[name] == e].mean() / 1e3)
                if (used[name] == e).any() else None
                for e in range(len(model.heads) + 1)
            ]  # fmt: skip
    return out


@torch.inference_mode()
def throughput(
    models: dict[str, nn.Module], x: torch.Tensor, batch: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Images per second over ``x`` in batches of ``batch``, alternating rounds (median)."""
    chunks = list(x.split(batch))
    per_round: dict[str, list[float]] = {n: [] for n in models}
    for model in models.values():
        model.eval()(chunks[0])
    for r in range(rounds):
        for name in list(models) if r % 2 == 0 else list(reversed(models)):
            start = time.perf_counter()
            for chunk in chunks:
                models[name](chunk)
            per_round[name].append(len(x) / (time.perf_counter() - start))
    return {
        n: {"images_per_s": float(torch.tensor(v).median()), "rounds": [round(t) for t in v]}
        for n, v in per_round.items()
    }


RUNTIMES = ("default", "mkldnn_off", "onnxruntime")  # torch eager twice, then onnxruntime


def timings(
    models: dict[str, nn.Module],
    bounds: dict[str, nn.Module],
    onnx_models: dict[str, nn.Module],
    x: torch.Tensor,
    settings: Settings,
) -> dict[str, dict[str, Any]]:
    """Batch-1 latency and batch-64 throughput of ``models``, and batch-1 latency of the
    ``bounds`` (what the exit path alone costs), in torch eager with PyTorch's default CPU
    backends and with oneDNN (mkldnn) off (on this tiny network the plain kernels are faster
    for both), then in onnxruntime (``onnx_models``: the same keys, exported)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    out: dict[str, dict[str, Any]] = {}
    try:
        for label in RUNTIMES:
            enabled = label == "default" and torch.backends.mkldnn.enabled
            timed = onnx_models if label == "onnxruntime" else {**models, **bounds}
            with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=enabled):
                warnings.simplefilter("ignore", UserWarning)  # oneDNN's TF32 note for Intel GPUs
                log(f"latency ({label}) ...")
                b1 = batch1_latency(timed, x, settings.latency_rounds, settings.warmup,
                                    settings.latency_block)  # fmt: skip
                b64 = throughput({n: timed[n] for n in models}, x, 64, settings.throughput_rounds)
            out[label] = {n: {"batch1": b1[n], "batch64": b64[n]} for n in models}
            out[label]["bounds"] = {
                n: {"mean_us": b1[n]["mean_us"], "speedup": b1[n]["speedup_vs_first"]}
                for n in bounds
            }
            out[label]["speedup_batch1"] = b1["early_exit"]["speedup_vs_first"]
            out[label]["speedup_batch64"] = (
                b64["early_exit"]["images_per_s"] / b64["baseline"]["images_per_s"]
            )
    finally:
        torch.set_num_threads(previous)
    return out


def exported(
    models: dict[str, nn.Module], x: torch.Tensor, folder: Path
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Every model exported with ``modelpress.runtime.export_onnx`` (fp32; an early-exit model
    as its cascade of ``If`` branches) and opened in onnxruntime, and how the early-exit
    file's outputs on ``x`` compare with the torch model's."""
    sessions = {}
    for name, model in models.items():
        path = export_onnx(model.eval(), x[:2], folder / f"{name}.onnx", mode="fp32").path
        sessions[name] = OrtModule(path, threads=LATENCY_THREADS)
    with torch.no_grad():
        expected, got = models["early_exit"](x), sessions["early_exit"](x)
    check = {
        "max_abs_diff": float((got - expected).abs().max()),
        "predictions_equal": bool(torch.equal(got.argmax(1), expected.argmax(1))),
    }
    return sessions, check


def exit_path_bounds(baseline: nn.Module, model: EarlyExitModel) -> dict[str, nn.Module]:
    """Two lower bounds of the early-exit latency: the model with every image leaving at the
    first exit (its head, confidence test and hooks included), and the first exit layer of
    the plain baseline alone (no head at all), when that layer reads the input image."""
    always = copy.deepcopy(model)
    first = 0.0 if always.criterion == "max_prob" else 1e9  # every image is confident enough
    always.set_thresholds([first] + [None] * (len(always.heads) - 1))
    bounds: dict[str, nn.Module] = {"all_leave_at_first_exit": always}
    layer = model.exit_names[0]
    if layer == next(name for name, _ in baseline.named_children()):
        bounds["first_exit_layer_only"] = baseline.get_submodule(layer)
    return bounds


# --------------------------------------------------------------------------- the run


@torch.no_grad()
def batch1_agrees(model: EarlyExitModel, x: torch.Tensor) -> bool:
    """Whether batch-1 early exit gives the batched predictions and exits for every image."""
    batched = model.eval()(x).argmax(1)
    used = model.last_exit_index
    single, single_used = [], []
    for row in x.split(1):
        single.append(model(row).argmax(1))
        single_used.append(model.last_exit_index)
    single, single_used = torch.cat(single), torch.cat(single_used)
    return bool(torch.equal(batched, single) and torch.equal(used, single_used))


def run(args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """Train both arms, reload the early-exit artifact, measure accuracy, exits and timing."""
    t0 = time.perf_counter()
    torch.set_num_threads(TRAIN_THREADS)
    bundle = mnist_bundle(data_dir(args.data, "mnist"), val=args.val,
                          train_samples=settings.train_samples, seed=args.seed)  # fmt: skip
    log(f"baseline: {MODEL_SPEC}, {len(bundle.train):,} images ...")
    baseline = fresh_lenet(bundle, args.seed)
    start = time.perf_counter()
    train_model(baseline, bundle, seed=args.seed, **settings.train)
    base = {"model": MODEL_SPEC, "train_images": len(bundle.train),
            "train_seconds": time.perf_counter() - start,
            "accuracy": accuracy_of(baseline.eval(), bundle)}  # fmt: skip
    log(f"baseline accuracy {base['accuracy']:.4f}; early exit ...")
    start = time.perf_counter()
    model, result = train_early_exit(bundle, settings, args.seed)
    seconds = time.perf_counter() - start
    path = result.save(args.work / name / "early_exit")
    loaded = mp.load(path)
    x = bundle.test.tensors[0]
    with torch.no_grad():
        reload_equal = bool(torch.equal(loaded(x), model.eval()(x)))
    final_only = copy.deepcopy(loaded)
    final_only.set_thresholds([None] * len(loaded.heads))
    calibration = result.stages[-1].learned
    ee = {
        "config": settings.exits,
        "train_images": len(bundle.train) - calibration["val_samples"],
        "calibration_images": calibration["val_samples"],
        "train_seconds": seconds,
        "artifact": str(path),
        "reload_outputs_equal": reload_equal,
        "thresholds": loaded.threshold_values(),
        "calibration": calibration,
        "final_exit_accuracy": accuracy_of(final_only, bundle),
        **exit_statistics(loaded, bundle.loader("test", 1000)),
    }
    lat_x = x[: settings.latency_samples]
    ee["batch1_equals_batched"] = batch1_agrees(loaded, lat_x)
    log(f"early exit accuracy {ee['accuracy']:.4f}, exits {ee['exit_fractions']}")
    models = {"baseline": baseline, "early_exit": loaded}
    bounds = exit_path_bounds(baseline, loaded)
    sessions, ee["onnx_check"] = exported({**models, **bounds}, lat_x, args.work / name / "onnx")
    log(f"onnx export: {ee['onnx_check']}")
    timing = timings(models, bounds, sessions, lat_x, settings)
    main = timing["default"]
    return {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "evaluation_split": "validation (held-out training images)" if args.val else "test",
        "data": bundle.spec,
        "evaluation_images": len(bundle.test),
        "latency_images": len(lat_x),
        "settings": asdict(settings),
        "target": {"min_speedup_batch1": TARGET_SPEEDUP, "accuracy": ">= baseline"},
        "baseline": base,
        "early_exit": ee,
        "timing": timing,
        "speedup_batch1": main["speedup_batch1"],
        "speedup_batch1_mkldnn_off": timing["mkldnn_off"]["speedup_batch1"],
        "speedup_batch1_onnxruntime": timing["onnxruntime"]["speedup_batch1"],
        "accuracy_delta_pp": 100 * (ee["accuracy"] - base["accuracy"]),
        "accuracy_at_least_baseline": ee["accuracy"] >= base["accuracy"],
        # met only if met in every runtime: the fastest one gives the fairest baseline
        "meets_target": ee["accuracy"] >= base["accuracy"]
        and min(t["speedup_batch1"] for t in timing.values()) >= TARGET_SPEEDUP,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- report


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report: the verdict, the table, how it was measured, the run metadata."""
    base, ee, timing = data["baseline"], data["early_exit"], data["timing"]
    split = "test" if data["evaluation_split"] == "test" else "val"
    n = data["evaluation_images"]
    exit_names = ee["config"]["exits"]
    fractions = ", ".join(
        f"{name} {f:.1%}" for name, f in zip([*exit_names, "final"], ee["exit_fractions"],
                                             strict=True)
    )  # fmt: skip
    rows = []
    for label, key in (("LeNet-5 alone", "baseline"), ("LeNet-5 + exit (cascade)", "early_exit")):
        acc = base["accuracy"] if key == "baseline" else ee["accuracy"]
        cells = [label, f"{acc:.2%}", f"{round((1 - acc) * n)}"]
        for backend in RUNTIMES:
            t = timing[backend]
            b1, b64 = t[key]["batch1"]["mean_us"], t[key]["batch64"]["images_per_s"]
            if key == "baseline":
                cells += [f"{b1:.0f}", f"{b64:,.0f}"]
            else:
                cells += [f"{b1:.0f} ({t['speedup_batch1']:.2f}×)",
                          f"{b64:,.0f} ({t['speedup_batch64']:.2f}×)"]  # fmt: skip
        rows.append(cells)
    headers = [
        "model", f"{split} accuracy", f"{split} errors",
        "b1 µs/image (speedup)", "b64 images/s (×)",
        "b1 µs/image, oneDNN off", "b64 images/s, oneDNN off",
        "b1 µs/image, onnxruntime", "b64 images/s, onnxruntime",
    ]  # fmt: skip
    delta_images = round(data["accuracy_delta_pp"] * n / 100)
    verdict = (
        f"**{'met' if data['meets_target'] else 'missed'}**: "
        f"{data['speedup_batch1']:.2f}× lower mean batch-1 latency with PyTorch's default CPU "
        f"backends, {data['speedup_batch1_mkldnn_off']:.2f}× with oneDNN off, "
        f"{data['speedup_batch1_onnxruntime']:.2f}× in onnxruntime, at "
        f"{data['accuracy_delta_pp']:+.2f} pp accuracy ({delta_images:+d} images)."
    )
    title = (
        f"# Early exit on LeNet-5 / MNIST{' (quick smoke run)' if data['mode'] == 'quick' else ''}"
    )
    if split == "val":
        title += " — validation run (for tuning; not the reported result)"
    parts = [
        title,
        f"Target: **≥ {TARGET_SPEEDUP:.0f}× lower mean batch-1 latency at accuracy ≥ the "
        f"baseline's** (BranchyNet: 5.4×). Result: {verdict}",
        markdown_table(headers, rows, align="lrrrrrrrr"),
        f"Images leaving at each exit ({split}): {fractions}. Accuracy of the early-exit "
        f"network's final exit alone: {ee['final_exit_accuracy']:.2%}. Calibrated threshold "
        f"(entropy, nats): {ee['thresholds']}; on the {ee['calibration_images']:,} calibration "
        f"images the cascade kept {ee['calibration']['cascade_accuracy']:.2%} (target "
        f"{ee['calibration']['target_accuracy']:.2%}). Batch-1 predictions and exits equal "
        f"the batched ones: {ee['batch1_equals_batched']}; reloaded artifact gives the "
        f"in-memory outputs exactly: {ee['reload_outputs_equal']}; the exported ONNX "
        f"cascade gives the torch model's predictions on every timed image: "
        f"{ee['onnx_check']['predictions_equal']} (logits within "
        f"{ee['onnx_check']['max_abs_diff']:.1e}).",
        _where_the_time_goes(data),
        _explanation(data),
        "## How the settings were chosen",
        TUNING_NOTE,
        "## Run",
        run_info_markdown(info),
    ]
    return "\n\n".join(parts)


def _where_the_time_goes(data: dict[str, Any]) -> str:
    layer = data["early_exit"]["config"]["exits"][0]
    first = data["early_exit"]["exit_fractions"][0]
    parts = []
    labels = {"default": "default backends", "mkldnn_off": "oneDNN off",
              "onnxruntime": "onnxruntime"}  # fmt: skip
    for backend, label in labels.items():
        t = data["timing"][backend]
        base_us = t["baseline"]["batch1"]["mean_us"]
        b = t["bounds"]
        paid = "head, entropy test and " + ("`If` branch" if backend == "onnxruntime" else "hooks")
        text = (
            f"{label}: the baseline takes {base_us:.0f} µs; with every image leaving at the "
            f"first exit ({paid} included) the model would take "
            f"{b['all_leave_at_first_exit']['mean_us']:.0f} µs, so "
            f"{b['all_leave_at_first_exit']['speedup']:.1f}× is the most any threshold can give"
        )
        if "first_exit_layer_only" in b:
            only = b["first_exit_layer_only"]
            text += (
                f"; `{layer}` alone takes {only['mean_us']:.0f} µs "
                f"({only['speedup']:.1f}× less than the whole network)"
            )
        parts.append(text)
    return (
        f"Where the time goes (batch 1, mean per image). {'; '.join(parts)}. With {first:.1%} "
        "of the images leaving at the first exit and the rest paying for the whole network "
        "plus the head, the mean lands between the two."
    )


def _explanation(data: dict[str, Any]) -> str:
    s, ee = data["settings"], data["early_exit"]
    t = s["train"]
    by_exit = data["timing"]["default"]["early_exit"]["batch1"]["mean_us_by_exit"]
    by_exit_text = ", ".join("—" if v is None else f"{v:.0f} µs" for v in by_exit)
    return (
        f"Both arms start from the same seeded `{MODEL_SPEC}` weights and train {t['epochs']} "
        f"epochs ({t['optimizer']}, lr {t['lr']}, {t['schedule']}, batch {t['batch_size']}); "
        f"the baseline on {data['baseline']['train_images']:,} images, the early-exit network "
        f"on {ee['train_images']:,} (the technique holds {ee['calibration_images']:,} out to "
        f"calibrate). Exit: `early_exit.branches` with {s['exits']}, joint loss with equal "
        "weights. Latency: each model runs every one of the "
        f"{data['latency_images']:,} images once per round at batch 1 (torch eager, "
        f"{LATENCY_THREADS} thread, `inference_mode`), in paired blocks: every block of "
        f"{s['latency_block']} images runs through each model in turn, the order rotating from "
        f"block to block, so load from elsewhere falls on both models alike; "
        f"{s['latency_rounds']} rounds, mean = total time / images, the median round is "
        "reported, and the speedup is the median over rounds of the baseline's mean over the "
        "early-exit model's in the same round. The early-exit model is the artifact reloaded "
        "with `modelpress.load`. "
        f"Mean batch-1 time of the images leaving at each exit: {by_exit_text}. Throughput: "
        f"the same images in batches of 64, {s['throughput_rounds']} alternating rounds, "
        "median. *oneDNN off* repeats the timing with `torch.backends.mkldnn.flags(enabled="
        "False)` for both models (PyTorch's plain CPU kernels; faster for this tiny network). "
        "*onnxruntime* times both models exported by `modelpress.runtime.export_onnx` (fp32; "
        "the early-exit model as one graph whose exit test is an `If` branch, so an image "
        "leaving at the exit skips the rest of the network) in onnxruntime sessions (1 "
        "thread, all graph optimizations), the same way."
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``<out>/early_exit_mnist[-val][-quick].{json,md}``."""
    args = parse_args(argv)
    settings = Settings().quick() if args.quick else Settings()
    name = result_name(NAME, args)
    info = run_info(__file__, argv,
                    threads={"train": TRAIN_THREADS, "latency": LATENCY_THREADS})  # fmt: skip
    data = run(args, settings, name)
    return finish(name, args, info, data, markdown, "\n\n## How")


if __name__ == "__main__":
    main_guard(main)
