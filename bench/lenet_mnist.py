"""LeNet-300-100 on MNIST: train a baseline, prune + fine-tune + quantize it, and prove the result.

Run from the repository root::

    python bench/lenet_mnist.py            # the real benchmark (a few minutes on 2 cores)
    python bench/lenet_mnist.py --quick    # smoke run: fewer samples and epochs, "-quick" files
    python bench/lenet_mnist.py --val      # tuning run: the test set is replaced by 5,000
                                           # images held out of the training set, "-val" files

For the baseline and every compressed variant it measures, in one run on one machine:
test error on the 10,000 MNIST test images (never used for training, calibration or choices),
the bytes of the artifact directory ``result.save(dir)`` writes against the bytes of the
fp32 ``torch.save(state_dict)`` file, nonzero parameters, and forward latency (1 thread,
batch 1 and 64, median) of the baseline against the model reloaded from the artifact; it
also checks that the reloaded model gives exactly the in-memory compressed model's outputs.
The target is a file >= 10x smaller at <= 0.2 percentage points more test error.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelpress as mp
from modelpress.measure import (
    count_nonzeros,
    count_params,
    directory_bytes,
    state_dict_bytes,
)
from modelpress.train import train_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    base_parser,
    data_dir,
    error_pct,
    finish,
    interleaved_latency,
    log,
    main_guard,
    markdown_table,
    mnist_bundle,
    result_name,
    run_info,
    run_info_markdown,
    speedup,
)

NAME = "lenet_mnist"
MODEL_SPEC = "zoo:lenet-300-100"
TARGET_RATIO = 10.0  # x smaller than the fp32 state-dict file
TARGET_ERROR_PP = 0.2  # at most this many percentage points more test error
# 1 training thread: on a shared 2-core machine, 2 threads are up to 10x slower whenever
# another process is busy; results depend on the thread count, so it is fixed and recorded
TRAIN_THREADS, LATENCY_THREADS = 1, 1

TUNING_NOTE = (
    "On a validation split, never on the test set: `python bench/lenet_mnist.py --val` trains "
    "on 55,000 training images and evaluates on the other 5,000 (results in "
    "`lenet_mnist-val.md`); the small sweep behind the choices (baseline lr, sparsity 0.8-0.92, "
    "fine-tune lr and length, iterative pruning, the 4-bit grid) is in `bench/README.md`. "
    "Sparsity 0.9 sat at the edge of the error budget there (+0.14 to +0.22 pp for 8 bits over "
    "two seeds), so 0.85 was chosen; the test set was used only for this report."
)


@dataclass(frozen=True)
class Settings:
    """Every hyperparameter of the benchmark (see the README for how they were chosen)."""

    train_samples: int | None = None  # None: all 60,000 training images
    baseline: dict[str, Any] = field(
        default_factory=lambda: dict(
            epochs=20, lr=2e-3, optimizer="adam", schedule="cosine", batch_size=128
        )
    )
    sparsity: float = 0.85
    finetune: dict[str, Any] = field(
        default_factory=lambda: dict(
            epochs=20, lr=1e-3, optimizer="adam", schedule="cosine", batch_size=128
        )
    )
    # variant name -> quant.rtn fields; every variant is prune -> fine-tune -> quantize
    variants: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "int8-channel": dict(bits=8),
            "int4-channel": dict(bits=4),
            "int4-channel-sym": dict(bits=4, symmetric=True),
            "int4-g64": dict(bits=4, group_size=64),
            "int4-g64-sym": dict(bits=4, group_size=64, symmetric=True),
            # then a short fine-tune through the 4-bit quantizer (straight-through estimator)
            "int4-channel+qft": dict(
                bits=4,
                then_train=dict(
                    epochs=3, lr=1e-4, optimizer="adam", schedule="cosine", batch_size=128
                ),
            ),
        }
    )
    int4_pick: str = "int4-channel"  # the 4-bit variant chosen on the validation split
    latency_runs: int = 300  # timed runs per model and batch size, over all rounds
    latency_rounds: int = 10
    latency_warmup: int = 5  # untimed runs before each round

    def quick(self) -> Settings:
        """The smoke-run version: 10,000 training images, 2 + 1 epochs, 30 latency runs."""
        return replace(
            self,
            train_samples=10_000,
            baseline={**self.baseline, "epochs": 2},
            finetune={**self.finetune, "epochs": 1},
            latency_runs=30,
            latency_rounds=3,
        )

    def recipe(self, name: str) -> mp.Recipe:
        """prune.magnitude (global) -> train (fine-tune) -> quant.rtn with ``variants[name]``
        (-> train through the quantizer, for a variant with ``then_train``)."""
        quant = dict(self.variants[name])
        then_train = quant.pop("then_train", None)
        stages = (
            mp.Stage.of("prune.magnitude", sparsity=self.sparsity, scope="global"),
            mp.Stage.of("train", **self.finetune),
            mp.Stage.of("quant.rtn", **quant),
        )
        if then_train:
            stages += (mp.Stage.of("train", **then_train),)
        return mp.Recipe(stages=stages, name=f"lenet-prune{round(self.sparsity * 100)}-ft-{name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    p = base_parser(__doc__, "mnist/", "<result name>/<variant>")
    p.add_argument("--val", action="store_true", help="tuning run on a validation split carved "
                   "from the training set (test set untouched); writes *-val files")  # fmt: skip
    return p.parse_args(argv)


def load_bundle(root: Path, settings: Settings, val: bool, seed: int) -> mp.DataBundle:
    """MNIST (see ``_common.mnist_bundle``) with this benchmark's training subset."""
    return mnist_bundle(root, val=val, train_samples=settings.train_samples, seed=seed)


# --------------------------------------------------------------------------- measurements


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, classes)`` of the whole split, in eval mode, batches of 1,000."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(chunk) for chunk in x.split(1000)])
    model.train(was_training)
    return out


def latencies(
    models: dict[str, nn.Module], x: torch.Tensor, settings: Settings
) -> dict[str, dict[str, float]]:
    """Forward latency (ms, 1 thread) of each model at batch 1 and 64, interleaved rounds."""
    return interleaved_latency(
        models, x, batches=(1, 64), runs=settings.latency_runs,
        rounds=settings.latency_rounds, warmup=settings.latency_warmup, threads=LATENCY_THREADS,
    )  # fmt: skip


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the run


def train_baseline(bundle: mp.DataBundle, settings: Settings, seed: int) -> tuple[nn.Module, dict]:
    """A freshly initialised (seeded) LeNet-300-100 trained with ``settings.baseline``."""
    torch.manual_seed(seed)  # the initial weights
    model = mp.load_model(
        MODEL_SPEC, input_shape=bundle.input_shape, num_classes=bundle.num_classes
    )
    summary = train_model(model, bundle, seed=seed, **settings.baseline)
    return model.eval(), summary


def run_variant(
    name: str, baseline: nn.Module, bundle: mp.DataBundle, settings: Settings, seed: int,
    art_dir: Path,
) -> tuple[dict[str, Any], nn.Module]:  # fmt: skip
    """Compress, save, reload; accuracy, size and the reload check. Latency comes later."""
    recipe = settings.recipe(name)
    start = time.perf_counter()
    result = mp.compress(baseline, recipe, data=bundle, seed=seed, latency_runs=0)
    seconds = time.perf_counter() - start
    path = result.save(art_dir / name)
    loaded = mp.load(path)
    acc, err, wrong = error_pct(result.model, bundle)
    acc_loaded, _, _ = error_pct(loaded, bundle)
    x = bundle.test.tensors[0]
    diff = (logits_of(result.model, x) - logits_of(loaded, x)).abs().max().item()
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    record = {
        "recipe": recipe.to_dict(),
        "artifact": str(path),
        "test_accuracy": acc,
        "test_error_pct": err,
        "test_errors": wrong,
        "reloaded_test_accuracy": acc_loaded,
        "reload_accuracy_equal": acc_loaded == acc,
        "reload_logits_max_abs_diff": diff,
        "params": count_params(result.model),
        "nonzeros": count_nonzeros(result.model),
        "nonzeros_reloaded": count_nonzeros(loaded),
        "bytes": directory_bytes(path),
        "bytes_by_file": files,
        "tensors_sha256": sha256(path / "tensors.safetensors"),
        "compress_seconds": seconds,
        "stages": [s.to_dict() for s in result.stages],
    }
    return record, loaded


def summarise(base: dict[str, Any], var: dict[str, Any]) -> None:
    """Add ratio, error increase, speedups and the target verdict to a variant record."""
    var["ratio"] = base["state_dict_bytes"] / var["bytes"]
    var["error_increase_pp"] = 100.0 * (var["test_errors"] - base["test_errors"]) / base["n"]
    for b in (1, 64):
        var[f"b{b}_speedup"] = speedup(base["latency"], var["latency"], b)
    var["meets_target"] = bool(
        var["ratio"] >= TARGET_RATIO and var["error_increase_pp"] <= TARGET_ERROR_PP + 1e-9
    )


def run(args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    root = data_dir(args.data, require="mnist")
    torch.set_num_threads(TRAIN_THREADS)
    bundle = load_bundle(root, settings, args.val, args.seed)
    log(f"data: {bundle.spec}: {len(bundle.train)} train / {len(bundle.test)} evaluation images")

    model, summary = train_baseline(bundle, settings, args.seed)
    acc, err, wrong = error_pct(model, bundle)
    split = "val" if args.val else "test"
    log(f"baseline: {summary['seconds']:.0f} s training, {split} error {err:.2f} %")
    base: dict[str, Any] = {
        "model": MODEL_SPEC,
        "train": {
            **settings.baseline,
            "seconds": summary["seconds"],
            "steps": summary["steps"],
            "final_loss": summary["final_loss"],
        },
        "test_accuracy": acc,
        "test_error_pct": err,
        "test_errors": wrong,
        "n": len(bundle.test),
        "params": count_params(model),
        "nonzeros": count_nonzeros(model),
        "state_dict_bytes": state_dict_bytes(model),
        "fp32_artifact_bytes": directory_bytes(mp.save(model, args.work / name / "baseline")),
    }

    variants: dict[str, dict[str, Any]] = {}
    loaded: dict[str, nn.Module] = {}
    for vname in settings.variants:
        variants[vname], loaded[vname] = run_variant(
            vname, model, bundle, settings, args.seed, args.work / name
        )
        v = variants[vname]
        log(f"{vname}: {v['compress_seconds']:.0f} s, {split} error {v['test_error_pct']:.2f} %, "
            f"{v['bytes']:,} bytes, reload equal: {v['reload_accuracy_equal']}")  # fmt: skip

    # latency last, after all training, interleaved over the baseline and reloaded models
    log("latency ...")
    lat = latencies({"baseline": model, **loaded}, bundle.test.tensors[0][:64], settings)
    base["latency"] = lat["baseline"]
    for vname in loaded:
        variants[vname]["latency"] = lat[vname]
        summarise(base, variants[vname])

    return {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "evaluation_split": "validation (held-out training images)" if args.val else "test",
        "data": bundle.spec,
        "train_images": len(bundle.train),
        "evaluation_images": len(bundle.test),
        "settings": asdict(settings),
        "target": {"min_ratio": TARGET_RATIO, "max_error_increase_pp": TARGET_ERROR_PP},
        "baseline": base,
        "variants": variants,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- report


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report: the table, the verdict, the stage history, the run metadata."""
    base, variants, s = data["baseline"], data["variants"], data["settings"]
    split = "test" if data["evaluation_split"] == "test" else "val"
    lat = base["latency"]
    rows = [[
        "baseline (fp32)", f"{base['test_error_pct']:.2f}", "—", f"{base['nonzeros']:,}",
        f"{base['state_dict_bytes']:,}", "1.0×", f"{lat['b1_median_ms'] * 1e3:.0f}",
        f"{lat['b64_median_ms'] * 1e3:.0f}", "—", "—",
    ]]  # fmt: skip
    for vname, v in variants.items():
        vl = v["latency"]
        label = f"prune {s['sparsity']:.0%} + ft + {vname}"
        rows.append([
            label + (" (int4 pick)" if vname == s["int4_pick"] else ""),
            f"{v['test_error_pct']:.2f}", f"{v['error_increase_pp']:+.2f}",
            f"{v['nonzeros']:,}", f"{v['bytes']:,}",
            f"{v['ratio']:.1f}×", f"{vl['b1_median_ms'] * 1e3:.0f} ({v['b1_speedup']:.2f}×)",
            f"{vl['b64_median_ms'] * 1e3:.0f} ({v['b64_speedup']:.2f}×)",
            "yes" if v["reload_accuracy_equal"] else "**no**",
            "**yes**" if v["meets_target"] else "no",
        ])  # fmt: skip
    headers = [
        "model", f"{split} error %", "Δ error pp", "nonzeros", "bytes on disk", "ratio",
        "latency b1 µs (speedup)", "latency b64 µs (speedup)", "reload = in-memory", "target met",
    ]  # fmt: skip
    met = [k for k, v in variants.items() if v["meets_target"]]
    pick = [k for k in ("int8-channel", s["int4_pick"]) if k in variants]
    verdict = "; ".join(
        f"{k}: {variants[k]['ratio']:.1f}× smaller, "
        f"{variants[k]['error_increase_pp']:+.2f} pp — "
        + ("**met**" if variants[k]["meets_target"] else "**missed**")
        for k in pick
    )
    title = f"# LeNet-300-100 on MNIST{' (quick smoke run)' if data['mode'] == 'quick' else ''}"
    if split == "val":
        title += " — validation run (for tuning; not the reported result)"
    parts = [
        title,
        f"Target: **≥ {TARGET_RATIO:.0f}× smaller file at ≤ {TARGET_ERROR_PP} pp error "
        f"increase** over the fp32 baseline. "
        f"The two headline variants — 8-bit, and the 4-bit grid picked on the validation "
        f"split ({s['int4_pick']}) — {verdict}. Over all {len(variants)} variants shown, "
        + (f"{len(met)} met it ({', '.join(met)})." if met else "none met it."),
        markdown_table(headers, rows, align="lrrrrrrrcc"),
        _explanation(data),
        "## How the settings were chosen",
        TUNING_NOTE,
        "## Stage by stage (first variant)",
        _stage_table(base, next(iter(variants.values()))),
        "## Run",
        run_info_markdown(info),
    ]
    return "\n\n".join(parts)


def _explanation(data: dict[str, Any]) -> str:
    s, base = data["settings"], data["baseline"]
    b, ft = s["baseline"], s["finetune"]
    split = (
        "the 10,000 MNIST test images"
        if data["evaluation_split"] == "test"
        else (f"{data['evaluation_images']:,} training images held out as a validation split")
    )
    return (
        f"Errors are on {split}; one image is "
        f"{100 / data['evaluation_images']:.2f} pp. The baseline is `{base['model']}` trained "
        f"{b['epochs']} epochs ({b['optimizer']}, lr {b['lr']}, {b['schedule']}, batch "
        f"{b['batch_size']}) on {data['train_images']:,} images. Each variant is a full "
        f"`modelpress.compress` recipe from it: `prune.magnitude` (global, sparsity "
        f"{s['sparsity']}) → `train` ({ft['epochs']} epochs, {ft['optimizer']}, lr {ft['lr']}, "
        f"{ft['schedule']}) → `quant.rtn` (weight-only, round to nearest, min-max grid; "
        "`channel` = one scale per output row, `g64` = one per 64 inputs, `sym` = symmetric, "
        "else asymmetric; fp16 scales); `+qft` adds a last `train` stage (3 epochs, adam, "
        "lr 1e-4, cosine) that fine-tunes through the 4-bit quantizer, masks and grid kept. "
        "*bytes on disk* is the whole artifact directory written by `result.save(dir)` "
        "(packed codes, sparse indices, scales, and a manifest that embeds the recipe and "
        "metrics) for the variants, and the `torch.save(state_dict)` file for the baseline; "
        "ratio = baseline bytes / variant bytes. Latency is the median forward pass over "
        f"{s['latency_runs']} runs with 1 thread (in {s['latency_rounds']} rounds that "
        "alternate between the models; median of the round medians), torch eager, of the "
        "baseline and of the model reloaded with `modelpress.load(dir)`, measured in the same "
        "run; the reloaded model holds dense fp32 weights with zeros, so no speedup is "
        "expected. *reload = in-memory*: the reloaded model's accuracy equals the in-memory "
        "compressed model's exactly (the JSON also has the max |logit| difference)."
    )


def _stage_table(base: dict[str, Any], var: dict[str, Any]) -> str:
    rows = [["baseline", f"{base['test_error_pct']:.2f}", f"{base['nonzeros']:,}",
             f"{base['state_dict_bytes']:,}", "torch.save(state_dict)"]]  # fmt: skip
    last = len(var["stages"])
    for i, st in enumerate(var["stages"], 1):
        m = st["metrics"]
        what = "the saved artifact" if i == last else "artifact, no embedded metrics"
        rows.append([
            f"{i}. {st['technique']}", f"{100 * (1 - m['eval']['accuracy']):.2f}",
            f"{m['nonzeros']:,}", f"{m['bytes']:,}", what,
        ])  # fmt: skip
    return markdown_table(["after", "error %", "nonzeros", "bytes", "what the bytes are"], rows,
                          align="lrrrl")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``<out>/lenet_mnist[-val][-quick].{json,md}``."""
    args = parse_args(argv)
    settings = Settings().quick() if args.quick else Settings()
    name = result_name(NAME, args)
    info = run_info(__file__, argv,
                    threads={"train": TRAIN_THREADS, "latency": LATENCY_THREADS})  # fmt: skip
    data = run(args, settings, name)
    return finish(name, args, info, data, markdown, "\n\n## Stage")


if __name__ == "__main__":
    main_guard(main)
