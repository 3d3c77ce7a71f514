"""Pruning on MNIST: one-shot, iterative, gradual and random pruning of LeNet-300-100 and LeNet-5.

Run from the repository root::

    python bench/pruning_mnist.py            # the real benchmark (~12 min on 2 cores)
    python bench/pruning_mnist.py --quick    # smoke run: fewer samples and epochs, "-quick" files
    python bench/pruning_mnist.py --val      # tuning run: the test set is replaced by 5,000
                                             # images held out of the training set, "-val" files

For each network it trains a baseline, then runs full ``modelpress.compress`` recipes that
reach the same final (global, unstructured) sparsity four ways, each with the same number of
training steps after pruning starts:

* ``oneshot``   -- ``prune.magnitude`` once, then ``train`` (fine-tune);
* ``iterative`` -- three ``prune.magnitude`` + ``train`` rounds (Han et al. 2015), the density
  falling geometrically to the target;
* ``gradual``   -- ``prune.gradual`` inside one ``train`` stage (Zhu & Gupta 2017);
* ``gradual-kd`` -- the same with ``distill.kd`` from the dense baseline (T = 4, alpha 0.9)
  in that ``train`` stage: prune -> distill in one recipe;
* ``random``    -- ``prune.random`` then ``train``: the honest baseline (Blalock et al. 2020).

Reported per variant: test error and its change, nonzeros (weights only and all parameters),
the nonzeros ratio (baseline / pruned), artifact bytes on disk against the fp32
``torch.save(state_dict)`` file, per-layer sparsity, and batch-1 latency (1 thread, torch
eager) of the reloaded model against the baseline: unstructured zeros give no speedup there.
Target: >= 15x fewer nonzeros at <= 0.1 percentage points more test error, for both networks.
"""

from __future__ import annotations

import argparse
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
    BenchError,
    adam,
    base_parser,
    data_dir,
    error_pct,
    finish,
    in_processes,
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

NAME = "pruning_mnist"
TARGET_NNZ_RATIO = 15.0  # x fewer nonzero parameters than the baseline
TARGET_ERROR_PP = 0.1  # at most this many percentage points more test error
TRAIN_THREADS, LATENCY_THREADS = 1, 1  # see bench/README.md (shared 2-core machine)
METHODS = ("oneshot", "iterative", "gradual", "gradual-kd", "random")
PRUNED_TYPES = (nn.Linear, nn.Conv2d)

TUNING_NOTE = (
    "No hyperparameter was chosen on the test set. LeNet-300-100's baseline (Adam, lr 2e-3, "
    "cosine, 20 epochs) comes from the validation sweep of `lenet_mnist`; its fine-tune lr "
    "(2e-3, 15 epochs) from a validation sweep of this benchmark (5,000 held-out training "
    "images, sparsity 0.94; table in `bench/README.md`): gradual pruning went from +0.20 pp "
    "with lr 1e-3 to +0.06 pp with lr 2e-3, while 30 epochs did not help. A first full run "
    "with lr 1e-3 had been made before that sweep; its numbers are in `bench/README.md` too. "
    "LeNet-5's settings (baseline 6 epochs Adam lr 1e-3; fine-tune 4 epochs lr 1e-3), the "
    "sparsity 0.94 (the smallest round value giving ≥ 15× fewer nonzeros once the unpruned "
    "biases are counted), the geometric iterative schedule and the gradual ramp (first 60 % "
    "of the steps) were fixed from the literature and the time budget, not tuned. The extra "
    "sparsities 0.92 and 0.96 of LeNet-300-100 are a sweep reported in full, so a best ratio "
    "read off them is a selected (optimistic) number; the headline is the pre-chosen 0.94. "
    "gradual-kd was added after a test run where LeNet-300-100 missed (gradual +0.34 pp) and "
    "chosen on validation (`pruning_mnist-val-kd.md`: gradual +0.06 pp, gradual-kd -0.02 pp); "
    "distill.kd keeps its defaults."
)


@dataclass(frozen=True)
class Net:
    """One network: its baseline training and the fine-tune budget of every variant."""

    spec: str
    baseline: dict[str, Any]
    finetune: dict[str, Any]  # the total training after pruning starts, same for all methods
    sparsities: tuple[float, ...]  # the first one is the headline (pre-chosen) sparsity
    sweep_methods: tuple[str, ...] = ("oneshot", "iterative", "gradual")  # extra sparsities
    methods: tuple[str, ...] = METHODS  # at the headline sparsity
    gradual_frequency: int = 100  # steps between mask updates
    gradual_end_fraction: float = 0.6


@dataclass(frozen=True)
class Settings:
    """Every hyperparameter of the benchmark."""

    train_samples: int | None = None  # None: all 60,000 training images
    nets: dict[str, Net] = field(
        default_factory=lambda: {
            "lenet-300-100": Net(
                spec="zoo:lenet-300-100",
                baseline=adam(20, 2e-3),
                finetune=adam(15, 2e-3),
                sparsities=(0.94, 0.92, 0.96),
            ),
            "lenet5": Net(
                spec="zoo:lenet5",
                baseline=adam(6, 1e-3),
                finetune=adam(4, 1e-3),
                sparsities=(0.94,),
            ),
        }
    )
    iterative_rounds: int = 3
    latency_runs: int = 300
    latency_rounds: int = 10
    latency_warmup: int = 5

    def quick(self) -> Settings:
        """The smoke-run version: 6,000 training images, 1 + 3 epochs, 30 latency runs."""
        nets = {
            k: replace(
                n,
                baseline={**n.baseline, "epochs": 1},
                finetune={**n.finetune, "epochs": 3},
                sparsities=n.sparsities[:1],
                gradual_frequency=5,
            )
            for k, n in self.nets.items()
        }
        return replace(self, train_samples=6_000, nets=nets, latency_runs=30, latency_rounds=3)

    def schedule(self, sparsity: float) -> list[float]:
        """Iterative targets: the density falls geometrically to ``1 - sparsity``."""
        k = self.iterative_rounds
        return [round(1 - (1 - sparsity) ** ((i + 1) / k), 4) for i in range(k)]

    def recipe(self, net: Net, method: str, sparsity: float) -> mp.Recipe:
        """The recipe of one variant; every one trains ``net.finetune['epochs']`` epochs."""
        ft, s = net.finetune, sparsity
        if method == "oneshot":
            stages = [mp.Stage.of("prune.magnitude", sparsity=s, scope="global"),
                      mp.Stage.of("train", **ft)]  # fmt: skip
        elif method == "random":
            stages = [mp.Stage.of("prune.random", sparsity=s, scope="global"),
                      mp.Stage.of("train", **ft)]  # fmt: skip
        elif method in ("gradual", "gradual-kd"):
            stages = [
                mp.Stage.of(
                    "prune.gradual",
                    sparsity=s,
                    scope="global",
                    initial_sparsity=0.0,
                    start_fraction=0.0,
                    end_fraction=net.gradual_end_fraction,
                    frequency=net.gradual_frequency,
                ),
                *([mp.Stage.of("distill.kd")] if method == "gradual-kd" else []),
                mp.Stage.of("train", **ft),
            ]
        elif method == "iterative":
            k = self.iterative_rounds
            epochs = [ft["epochs"] // k + (1 if i < ft["epochs"] % k else 0) for i in range(k)]
            stages = []
            for s_i, e_i in zip(self.schedule(s), epochs, strict=True):
                stages += [mp.Stage.of("prune.magnitude", sparsity=s_i, scope="global"),
                           mp.Stage.of("train", **{**ft, "epochs": e_i})]  # fmt: skip
        else:
            raise ValueError(method)
        name = f"{net.spec.removeprefix('zoo:')}-{method}-{round(s * 100)}"
        return mp.Recipe(stages=tuple(stages), name=name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    p = base_parser(__doc__, "mnist/", "<result name>/<net>/<variant>")
    p.add_argument("--val", action="store_true", help="tuning run on a validation split carved "
                   "from the training set (test set untouched); writes *-val files")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="train the two networks "
                   "in parallel processes (1 thread each; default 2); latency is always "
                   "measured afterwards in one process")  # fmt: skip
    p.add_argument("--nets", default=",".join(Settings().nets),
                   help="comma-separated networks to run (default: both)")  # fmt: skip
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods of {','.join(METHODS)} (default: all)",
    )
    p.add_argument("--tag", default="", help="suffix of the result name, e.g. for a sweep")
    return p.parse_args(argv)


def select(settings: Settings, args: argparse.Namespace) -> Settings:
    """``settings`` with only the networks and methods asked for on the command line."""
    nets, methods = args.nets.split(","), tuple(args.methods.split(","))
    for asked, known in ((nets, tuple(settings.nets)), (methods, METHODS)):
        unknown = [x for x in asked if x not in known]
        if unknown:
            raise BenchError(f"unknown choice {unknown[0]!r}; choose from {', '.join(known)}")
    picked = {k: replace(settings.nets[k], methods=methods) for k in nets}
    return replace(settings, nets=picked)


def load_bundle(root: Path, settings: Settings, val: bool, seed: int) -> mp.DataBundle:
    """MNIST (see ``_common.mnist_bundle``) with this benchmark's training subset."""
    return mnist_bundle(root, val=val, train_samples=settings.train_samples, seed=seed)


# --------------------------------------------------------------------------- measurements


def weight_stats(model: nn.Module) -> dict[str, Any]:
    """Per-layer weight counts and zeros of a plain (reloaded, unparametrized) model."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNED_TYPES):
            w = module.weight.detach()
            nnz = int(torch.count_nonzero(w))
            layers[name] = {"weights": w.numel(), "nonzeros": nnz,
                            "sparsity": 1 - nnz / w.numel()}  # fmt: skip
    return {
        "weights": sum(v["weights"] for v in layers.values()),
        "weight_nonzeros": sum(v["nonzeros"] for v in layers.values()),
        "layers": layers,
    }


# --------------------------------------------------------------------------- one network


def run_net(key: str, args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """Baseline and every variant of one network (runs in its own process with --jobs 2)."""
    torch.set_num_threads(TRAIN_THREADS)
    net = settings.nets[key]
    bundle = load_bundle(data_dir(args.data, require="mnist"), settings, args.val, args.seed)
    work = args.work / name / key
    split = "val" if args.val else "test"

    torch.manual_seed(args.seed)  # the initial weights
    model = mp.load_model(net.spec, input_shape=bundle.input_shape, num_classes=bundle.num_classes)
    summary = train_model(model, bundle, seed=args.seed, **net.baseline)
    model.eval()
    acc, err, wrong = error_pct(model, bundle)
    log(f"{key} baseline: {summary['seconds']:.0f} s training, {split} error {err:.2f} %")
    base_path = mp.save(model, work / "baseline")
    base: dict[str, Any] = {
        "model": net.spec,
        "train": {
            **net.baseline,
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
        **weight_stats(model),
        "state_dict_bytes": state_dict_bytes(model),
        "fp32_artifact": str(base_path),
        "fp32_artifact_bytes": directory_bytes(base_path),
    }

    variants: dict[str, dict[str, Any]] = {}
    jobs = [(m, net.sparsities[0]) for m in net.methods]
    jobs += [(m, s) for s in net.sparsities[1:] for m in net.sweep_methods if m in net.methods]
    for method, sparsity in jobs:
        vname = f"{method}-{round(sparsity * 100)}"
        recipe = settings.recipe(net, method, sparsity)
        start = time.perf_counter()
        result = mp.compress(model, recipe, data=bundle, seed=args.seed, latency_runs=0)
        seconds = time.perf_counter() - start
        path = result.save(work / vname)
        loaded = mp.load(path)
        acc, err, wrong = error_pct(result.model, bundle)
        acc_loaded, _, _ = error_pct(loaded, bundle)
        nnz = count_nonzeros(loaded)
        v = {
            "method": method,
            "sparsity": sparsity,
            "headline": sparsity == net.sparsities[0],
            "recipe": recipe.to_dict(),
            "artifact": str(path),
            "test_accuracy": acc,
            "test_error_pct": err,
            "test_errors": wrong,
            "error_increase_pp": 100.0 * (wrong - base["test_errors"]) / base["n"],
            "reloaded_test_accuracy": acc_loaded,
            "reload_accuracy_equal": acc_loaded == acc,
            "params": count_params(loaded),
            "nonzeros": nnz,
            "nonzeros_in_memory": count_nonzeros(result.model),
            **weight_stats(loaded),
            "bytes": directory_bytes(path),
            "bytes_by_file": {
                p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()
            },
            "compress_seconds": seconds,
            "stages": [s.to_dict() for s in result.stages],
        }
        v["nnz_ratio"] = base["nonzeros"] / v["nonzeros"]
        v["weight_nnz_ratio"] = base["weight_nonzeros"] / v["weight_nonzeros"]
        v["bytes_ratio"] = base["state_dict_bytes"] / v["bytes"]
        v["meets_target"] = bool(v["nnz_ratio"] >= TARGET_NNZ_RATIO
                                 and v["error_increase_pp"] <= TARGET_ERROR_PP + 1e-9)  # fmt: skip
        variants[vname] = v
        log(f"{key} {vname}: {seconds:.0f} s, {split} error {err:.2f} % "
            f"({v['error_increase_pp']:+.2f} pp), {v['nnz_ratio']:.1f}x fewer nonzeros, "
            f"{v['bytes']:,} bytes")  # fmt: skip
    return {"baseline": base, "variants": variants, "settings": asdict(net),
            "train_images": len(bundle.train), "evaluation_images": len(bundle.test),
            "data": bundle.spec}  # fmt: skip


def latencies(
    paths: dict[str, str], x: torch.Tensor, settings: Settings
) -> dict[str, dict[str, float]]:
    """Batch-1 forward latency (ms, 1 thread) of each reloaded model, interleaved in rounds."""
    torch.set_num_threads(LATENCY_THREADS)
    models = {k: mp.load(p).eval() for k, p in paths.items()}
    return interleaved_latency(
        models, x, batches=(1,), runs=settings.latency_runs, rounds=settings.latency_rounds,
        warmup=settings.latency_warmup, threads=LATENCY_THREADS,
    )  # fmt: skip


def run(args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    data_dir(args.data, require="mnist")  # fail early, in this process
    keys = list(settings.nets)
    done = in_processes(run_net, keys[::-1], args, settings, name, jobs=args.jobs)
    nets = {k: done[k] for k in keys}

    # latency last, after all training, in this process: baseline vs reloaded headline variants
    log("latency ...")
    bundle = load_bundle(data_dir(args.data, require="mnist"), settings, args.val, args.seed)
    x = bundle.test.tensors[0]
    for res in nets.values():
        paths = {"baseline": res["baseline"]["fp32_artifact"]}
        paths |= {v: r["artifact"] for v, r in res["variants"].items() if r["headline"]}
        lat = latencies(paths, x, settings)
        res["baseline"]["latency"] = lat.pop("baseline")
        for v, entry in lat.items():
            res["variants"][v]["latency"] = entry
            res["variants"][v]["b1_speedup"] = speedup(res["baseline"]["latency"], entry, 1)
    for res in nets.values():
        ok = [v for v in res["variants"].values() if v["error_increase_pp"] <= TARGET_ERROR_PP
              + 1e-9]  # fmt: skip
        res["best_nnz_ratio_within_budget"] = max((v["nnz_ratio"] for v in ok), default=None)
        res["target_met"] = any(v["meets_target"] for v in res["variants"].values()
                                if v["headline"])  # fmt: skip
    return {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "evaluation_split": "validation (held-out training images)" if args.val else "test",
        "settings": {
            "iterative_rounds": settings.iterative_rounds,
            "train_samples": settings.train_samples,
            "latency_runs": settings.latency_runs,
            "latency_rounds": settings.latency_rounds,
        },
        "target": {"min_nnz_ratio": TARGET_NNZ_RATIO, "max_error_increase_pp": TARGET_ERROR_PP},
        "nets": nets,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- report

LABELS = {
    "oneshot": "one-shot magnitude + fine-tune",
    "iterative": "iterative magnitude (3 rounds)",
    "gradual": "gradual (Zhu & Gupta) in one train",
    "gradual-kd": "gradual + `distill.kd` from the dense baseline",
    "random": "random + fine-tune (control)",
}


def _net_table(res: dict[str, Any], split: str) -> str:
    base = res["baseline"]
    rows = [[
        "baseline (fp32)", "0", f"{base['test_error_pct']:.2f}", "—",
        f"{base['weight_nonzeros']:,}", f"{base['nonzeros']:,}", "1.0×",
        f"{base['state_dict_bytes']:,}", "1.0×",
        f"{base['latency']['b1_median_ms'] * 1e3:.0f}", "—",
    ]]  # fmt: skip
    for v in sorted(res["variants"].values(), key=lambda r: (not r["headline"], r["sparsity"])):
        lat = (f"{v['latency']['b1_median_ms'] * 1e3:.0f} ({v['b1_speedup']:.2f}×)"
               if "latency" in v else "—")  # fmt: skip
        rows.append([
            LABELS[v["method"]], f"{v['sparsity']:.2f}", f"{v['test_error_pct']:.2f}",
            f"{v['error_increase_pp']:+.2f}", f"{v['weight_nonzeros']:,}",
            f"{v['nonzeros']:,}", f"{v['nnz_ratio']:.1f}×", f"{v['bytes']:,}",
            f"{v['bytes_ratio']:.1f}×", lat, "**yes**" if v["meets_target"] else "no",
        ])  # fmt: skip
    headers = ["variant", "sparsity", f"{split} error %", "Δ pp", "weight nonzeros",
               "all nonzeros", "nonzeros ratio", "bytes on disk", "bytes ratio",
               "latency b1 µs (speedup)", "target met"]  # fmt: skip
    return markdown_table(headers, rows, align="lrrrrrrrrrc")


def _best(res: dict[str, Any]) -> dict[str, Any]:
    """The headline variant with the lowest error (ties: magnitude methods in order)."""
    heads = [v for v in res["variants"].values() if v["headline"]]
    return min(heads, key=lambda v: (v["test_errors"], METHODS.index(v["method"])))


def _layer_table(res: dict[str, Any]) -> str:
    best, base = _best(res), res["baseline"]
    rows = []
    for layer, st in best["layers"].items():
        rows.append([layer, f"{st['weights']:,}", f"{st['nonzeros']:,}",
                     f"{100 * st['sparsity']:.1f} %",
                     f"{st['weights'] / max(st['nonzeros'], 1):.1f}×"])  # fmt: skip
    rows.append(["all weights", f"{base['weights']:,}", f"{best['weight_nonzeros']:,}",
                 f"{100 * (1 - best['weight_nonzeros'] / base['weights']):.1f} %",
                 f"{best['weight_nnz_ratio']:.1f}×"])  # fmt: skip
    return (f"Per-layer sparsity of the best headline variant (`{best['method']}`, counted as "
            "zeros in the reloaded model):\n\n"
            + markdown_table(["layer", "weights", "nonzeros", "sparsity", "fewer"], rows,
                             align="lrrrr"))  # fmt: skip


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report."""
    split = "test" if data["evaluation_split"] == "test" else "val"
    title = f"# Pruning LeNet-300-100 and LeNet-5 on MNIST{' (quick smoke run)' if data['mode'] == 'quick' else ''}"
    if split == "val":
        title += " — validation run (for tuning; not the reported result)"
    verdicts = []
    for key, res in data["nets"].items():
        met = [v["method"] for v in res["variants"].values() if v["headline"] and
               v["meets_target"]]  # fmt: skip
        best = res["best_nnz_ratio_within_budget"]
        at15 = [f"{v['method']} {v['error_increase_pp']:+.2f} pp ({v['nnz_ratio']:.1f}×)"
                for v in res["variants"].values() if v["headline"]]  # fmt: skip
        verdicts.append(
            f"- **{key}: target {'met' if met else 'missed'}**"
            + (f" by {', '.join(met)}" if met else "")
            + f". At the headline sparsity: {'; '.join(at15)}. Best nonzeros ratio within "
            f"{TARGET_ERROR_PP} pp over all variants run: "
            + (f"{best:.1f}×." if best else "none within budget.")
        )
    parts = [
        title,
        f"Target: **≥ {TARGET_NNZ_RATIO:.0f}× fewer nonzero parameters at ≤ {TARGET_ERROR_PP} "
        "pp test-error increase** over the dense baseline, for both networks (Han et al. 2015 "
        "reached 12× on both).",
        "\n".join(verdicts),
    ]
    for key, res in data["nets"].items():
        s = res["settings"]
        b, ft = s["baseline"], s["finetune"]
        parts += [
            f"## {key} (`{s['spec']}`)",
            _net_table(res, split),
            f"Baseline: {b['epochs']} epochs ({b['optimizer']}, lr {b['lr']}, {b['schedule']}, "
            f"batch {b['batch_size']}) on {res['train_images']:,} images, "
            f"{res['baseline']['params']:,} parameters. Every variant trains "
            f"{ft['epochs']} epochs ({ft['optimizer']}, lr {ft['lr']}, {ft['schedule']}) after "
            "pruning starts: one-shot and random in one `train` stage; iterative in three "
            "`prune.magnitude` (global) + `train` rounds to sparsities "
            f"{_schedule_text(res)}; gradual in one `train` stage with `prune.gradual` "
            f"(global, cubic from 0 over the first {s['gradual_end_fraction']:.0%} of the steps, "
            f"masks updated every {s['gradual_frequency']} steps); gradual + KD the same with "
            "`distill.kd` before that `train` stage (teacher: the dense baseline, T = 4, "
            "alpha 0.9: loss = 0.9 · T² · KL + 0.1 · cross-entropy).",
            _layer_table(res),
        ]
    parts += [
        "## What the columns are",
        f"Errors are on {'the 10,000 MNIST test images' if split == 'test' else 'a validation split'}; "
        "one image is 0.01 pp on the test set, so differences of a few hundredths are noise "
        "(one seed). *Nonzeros* are counted on the model reloaded with `modelpress.load(dir)`: "
        "weights of the Linear/Conv layers, and all parameters (weights and the unpruned "
        "biases); *nonzeros ratio* = baseline / variant, all parameters. *Bytes on disk* is "
        "the whole artifact directory `result.save(dir)` writes (sparse fp32 weights: values "
        "and indices, plus a manifest embedding the recipe and metrics), against the baseline's "
        "fp32 `torch.save(state_dict)` file. **Unstructured sparsity gives no CPU speedup in "
        "torch eager**: the reloaded model holds dense fp32 weight tensors that are mostly "
        "zeros and runs the same dense kernels, so its batch-1 latency (median of "
        f"{data['settings']['latency_runs']} runs, 1 thread, in "
        f"{data['settings']['latency_rounds']} rounds alternating between the models) equals "
        "the baseline's within noise. A speedup would need a sparse kernel/runtime or "
        "structured (channel) pruning.",
        "## How the settings were chosen",
        TUNING_NOTE,
        "## Run",
        run_info_markdown(info),
    ]
    return "\n\n".join(parts)


def _schedule_text(res: dict[str, Any]) -> str:
    heads = [v for v in res["variants"].values() if v["headline"] and v["method"] == "iterative"]
    if not heads:
        return "—"
    stages = heads[0]["recipe"]["stages"]
    return " → ".join(str(st["sparsity"]) for st in stages if st["technique"] == "prune.magnitude")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``<out>/pruning_mnist[-val][-quick].{json,md}``."""
    args = parse_args(argv)
    settings = select(Settings().quick() if args.quick else Settings(), args)
    name = result_name(NAME, args)
    info = run_info(__file__, argv,
                    threads={"train": TRAIN_THREADS, "latency": LATENCY_THREADS,
                             "processes": args.jobs})  # fmt: skip
    data = run(args, settings, name)
    return finish(name, args, info, data, markdown, "\n\n## What the columns")


if __name__ == "__main__":
    main_guard(main)
