"""Structured pruning of ResNet-20 on CIFAR-10 to half the FLOPs: modelpress vs Torch-Pruning.

Run from the repository root::

    python bench/structured_cifar.py            # the real benchmark (~35-45 min on 2 cores)
    python bench/structured_cifar.py --quick    # smoke run (< 2 min): 1,024 training images,
                                                # 500 evaluation images; "-quick" files
    python bench/structured_cifar.py --val      # tuning run: the test set is replaced by 5,000
                                                # images held out of the training set; "-val"

The CIFAR-10 here is a JPEG quality-75 copy (shared data README, section 7), so the baseline
is Distiller's ResNet-20 checkpoint fine-tuned briefly on the JPEG training split, and every
pruned model is compared with that baseline on the JPEG test split in the same run. The arms
all start from the baseline and are fine-tuned with the same budget, loop
(``modelpress.train.fit``), optimizer, data order and augmentation (random 32x32 crop of the
4-pixel zero-padded image, horizontal flip):

* ``modelpress``       -- ``compress`` with ``prune.structured`` (L1, global, FLOPs target
  0.5) then ``train``;
* ``modelpress-l2`` -- the same with L2 filter norms (added after the first full run, whose
  L1 allocation kept layer 3 narrow where Torch-Pruning kept it wide; see bench/README.md);
* ``modelpress-layer`` -- the same with ``scope: layer`` (uniform layer-wise);
* ``modelpress-l2-kd`` -- ``modelpress-l2`` with ``distill.kd`` before ``train`` (the unpruned
  baseline as the teacher, the technique's defaults: temperature 4, alpha 0.9), the prune ->
  distill recipe (``modelpress-l2-kd-hint``, tried on validation: also ``distill.hint`` on the
  three stage outputs, MSE through a learned adapter, weight 1;
  ``modelpress-l2-search-kd-hint`` also lets ``prune.structured`` search the allocation of
  the FLOPs budget over the groups, EagleEye's adaptive-BN search);
* ``torch-pruning``    -- Torch-Pruning's ``BasePruner`` (``MetaPruner``), group L1 magnitude,
  global, ``fc`` ignored, its ratio bisected until FLOPs <= 0.5 of the baseline's.

Reported per model: accuracy and its change in pp, parameters, FLOPs (``modelpress.measure``
for every model), bytes, and latency in torch eager and onnxruntime at batch 1 and 64 with
fixed threads (median of interleaved rounds); speedup = baseline / model. Target: <= 0.5 pp
accuracy loss and >= 1.7x measured CPU speedup at batch 1 and batch 64.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelpress as mp
from modelpress.measure import (
    count_flops,
    count_params,
    directory_bytes,
    state_dict_bytes,
)
from modelpress.registry import technique_names
from modelpress.train import train_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar_train import (
    Evaluator,
    Splits,
    TrainingSettings,
    load_splits,
    reuse_note,
    run_baseline,
    train_record,
)
from _common import (
    VAL_SIZE,
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

NAME = "structured_cifar"
FLOPS_KEEP = 0.5  # a pruned model keeps at most this fraction of the baseline's FLOPs
TARGET_SPEEDUP, TARGET_DROP_PP = 1.7, 0.5
ITER_STEPS = 3  # the -iter arms prune in this many steps, each followed by its share of epochs
STAGE_HINTS = tuple(f"layer{i}" for i in (1, 2, 3))  # ResNet stage outputs (FitNets)
BLOCK_HINTS = tuple(f"layer{i}.{j}" for i in (1, 2, 3) for j in (0, 1, 2))  # every block's


@dataclass(frozen=True)
class ModelpressArm:
    """A modelpress arm: the options of ``prune.structured``, whether each fine-tune distills
    the logits (``distill.kd``) and also the stage outputs (``distill.hint``, FitNets), and in
    how many prune + fine-tune steps the FLOPs target is reached."""

    options: dict[str, Any]
    distill: bool = False
    steps: int = 1
    hints: tuple[str, ...] = ()  # layers whose outputs distill.hint pulls to the teacher's
    # the teacher: the baseline, or the logit mean of this many baselines fine-tuned from the
    # checkpoint with seeds seed, seed + 1, ... (hints still pair with the baseline)
    teachers: int = 1


L2, PER_FLOP = {"scope": "global", "importance": "l2"}, {"flops_aware": True}
# EagleEye: 40 random allocations of the budget, each scored by its loss on 10 training batches
# after re-estimating its BatchNorm statistics on 10 others
SEARCH = {"search_candidates": 40, "search_batches": 10}
GROUP = {"scope": "global", "importance": "group_l1"}  # Torch-Pruning's criterion (DepGraph)
# residual streams left whole (their groups are found by a producer: the stem, a downsample)
STREAM = {"layer_sparsity": {"conv1": 0.0}}  # the 32×32 stream
INNER = {"layer_sparsity": {"conv1": 0.0, "re:.*downsample.*": 0.0}}  # every stream
MODELPRESS_ARMS = {
    "modelpress": ModelpressArm({"scope": "global", "importance": "l1"}),
    "modelpress-l2": ModelpressArm(L2),
    "modelpress-layer": ModelpressArm({"scope": "layer", "importance": "l1"}),
    "modelpress-l2-kd": ModelpressArm(L2, distill=True),
    "modelpress-l2-kd-hint": ModelpressArm(L2, distill=True, hints=STAGE_HINTS),
    "modelpress-l2-kd-blockhint": ModelpressArm(L2, distill=True, hints=BLOCK_HINTS),
    "modelpress-l2-search-kd-hint": ModelpressArm(L2 | SEARCH, distill=True, hints=STAGE_HINTS),
    "modelpress-l2-stream-kd-hint": ModelpressArm(L2 | STREAM, distill=True, hints=STAGE_HINTS),
    "modelpress-l2-inner-kd-hint": ModelpressArm(L2 | INNER, distill=True, hints=STAGE_HINTS),
    "modelpress-l2-kd3-hint": ModelpressArm(L2, distill=True, hints=STAGE_HINTS, teachers=3),
    "modelpress-l2-perflop": ModelpressArm(L2 | PER_FLOP),
    "modelpress-l2-perflop-kd": ModelpressArm(L2 | PER_FLOP, distill=True),
    "modelpress-l2-iter": ModelpressArm(L2, steps=ITER_STEPS),
    "modelpress-l2-iter-kd": ModelpressArm(L2, distill=True, steps=ITER_STEPS),
    "modelpress-taylor": ModelpressArm({"scope": "global", "importance": "taylor"}),
    "modelpress-bn": ModelpressArm({"scope": "global", "importance": "bn_scale"}),
    "modelpress-group": ModelpressArm(GROUP),
    "modelpress-group-kd": ModelpressArm(GROUP, distill=True),
}
ARMS = (*MODELPRESS_ARMS, "torch-pruning")
# a plain run: the arms of the reported results (the others were tried on validation only)
DEFAULT_ARMS = ("modelpress", "modelpress-l2", "modelpress-layer", "modelpress-l2-kd",
                "torch-pruning")  # fmt: skip
INSTALL_HINT = "pip install -r bench/requirements.txt"


@dataclass(frozen=True)
class Settings(TrainingSettings):
    """Every hyperparameter of the benchmark (see bench/README.md for how they were chosen)."""

    round_to: int = 8  # channel counts kept multiples of this (both libraries); 1: off
    latency_threads: tuple[int, ...] = (1, 2)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_runs: int = 100
    # short rounds: this VM switches between a fast and a ~40 % slower phase every second or
    # so, and a paired ratio only cancels a phase that lasts the whole round
    latency_rounds: int = 25
    latency_warmup: int = 2

    def quick(self) -> Settings:
        """The smoke-run version: 1,024 training and 500 evaluation images, 1 + 1 epochs."""
        return replace(self.quick_data(), latency_threads=(1,), latency_runs=20,
                       latency_rounds=2)  # fmt: skip


# --------------------------------------------------------------------------- models


def describe(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Params, FLOPs (``modelpress.measure.count_flops``), fp32 state-dict bytes, conv widths."""
    widths = {name: m.out_channels for name, m in model.named_modules()
              if isinstance(m, nn.Conv2d)}  # fmt: skip
    return {"params": count_params(model), "flops": count_flops(model, example),
            "state_dict_bytes": state_dict_bytes(model), "conv_out_channels": widths}  # fmt: skip


def structured_available() -> bool:
    """Whether ``prune.structured`` is registered in this modelpress."""
    return "prune.structured" in technique_names()


def modelpress_recipe(settings: Settings, arm: ModelpressArm, finetune: bool = True) -> mp.Recipe:
    """``arm.steps`` times: ``prune.structured`` (``arm.options``; step i of k keeps
    1 − i·(1 − FLOPS_KEEP)/k of the original FLOPs, so FLOPS_KEEP at the end), then ``train``
    for 1/k of the fine-tune epochs (after ``distill.kd`` from the unpruned model if
    ``arm.distill``)."""
    train = settings.train_config("finetune")
    if train["epochs"] % arm.steps:
        raise BenchError(f"{train['epochs']} fine-tune epochs do not split into {arm.steps} "
                         f"pruning steps; pass --epochs as a multiple of {arm.steps}")  # fmt: skip
    train["epochs"] //= arm.steps
    distills = finetune and arm.distill
    stages = []
    for i in range(1, arm.steps + 1):
        prune: dict[str, Any] = dict(flops_target=1 - i * (1 - FLOPS_KEEP) / arm.steps)
        if arm.steps > 1:
            prune["flops_of"] = "original"
        if settings.round_to > 1:
            prune["round_to"] = settings.round_to
        stages.append(mp.Stage.of("prune.structured", **prune, **arm.options))
        if distills:
            stages.append(mp.Stage.of("distill.kd"))
        if distills and arm.hints:  # pruned layers' outputs pulled to the teacher's
            member = "members.0." if arm.teachers > 1 else ""  # the baseline in an ensemble
            pairs = {n: member + n for n in arm.hints}
            stages.append(mp.Stage.of("distill.hint", pairs=pairs))
        if finetune:
            stages.append(mp.Stage.of("train", **train))
    options = arm.options
    ranking = "-perflop" if options.get("flops_aware") else ""
    ranking += "-search" if options.get("search_candidates") else ""
    for suffix, pinned in (("-stream", STREAM), ("-inner", INNER)):
        ranking += suffix if options.get("layer_sparsity") == pinned["layer_sparsity"] else ""
    steps = f"-{arm.steps}steps" if arm.steps > 1 else ""
    hints = {(): "", STAGE_HINTS: "-hint", BLOCK_HINTS: "-blockhint"}[arm.hints if distills else ()]
    kd = (f"-kd{arm.teachers if arm.teachers > 1 else ''}" if distills else "") + hints
    name = (f"structured-{options['scope']}-{options['importance']}{ranking}-flops{FLOPS_KEEP}"
            f"{steps}{kd}")  # fmt: skip
    return mp.Recipe(stages=tuple(stages), name=name)


def run_modelpress(baseline: nn.Module, splits: Splits, settings: Settings, arm: str, seed: int,
                   out: Path, ev: Evaluator,
                   teacher: list[nn.Module] | None = None) -> dict[str, Any]:  # fmt: skip
    """``compress(baseline, [prune.structured, (distill.kd,) train] × steps)`` on the augmented
    batches (accuracy "after pruning" is after the first step), distilling from ``teacher``
    (an ensemble) or else the baseline; the model is saved as an artifact and reloaded (the
    reloaded one is what gets measured)."""
    recipe = modelpress_recipe(settings, MODELPRESS_ARMS[arm])
    example = splits.eval_inputs[:1]
    batches = splits.batches(settings, seed)
    result = mp.compress(baseline, recipe, data=batches, evaluate=ev, teacher=teacher,
                         example_inputs=example, seed=seed, latency_runs=0)  # fmt: skip
    path = result.save(out / "artifact")
    loaded = mp.load(path).eval()
    prune_stage = result.stages[0]
    trains = [s for s in result.stages if s.technique == "train"]
    cfg = settings.train_config("finetune")
    record = {
        "recipe": recipe.to_dict(),
        "pruned_correct": round(prune_stage.metrics["eval"]["accuracy"] * ev.n),
        "prune_seconds": prune_stage.seconds,
        "learned": prune_stage.learned,
        "train": train_record(cfg, sum(t.seconds for t in trains),
                              sum(t.learned["steps"] for t in trains),
                              trains[-1].learned["final_loss"], batches),
        "correct": ev.correct(loaded),
        "in_memory_correct": round(result.final["eval"]["accuracy"] * ev.n),  # == correct?
        "artifact": str(path),
        "artifact_bytes": directory_bytes(path),
        "model_file": str(path),
        "model_format": "artifact",
    }  # fmt: skip
    if settings.round_to > 1 and arm == "modelpress":
        plain = replace(settings, round_to=1)
        arch = mp.compress(baseline, modelpress_recipe(plain, MODELPRESS_ARMS[arm], finetune=False),
                           data=splits.batches(settings, seed), example_inputs=example,
                           seed=seed, latency_runs=0)  # fmt: skip
        record["unrounded_file"] = str(arch.save(out / "unrounded"))
    return record


def _torch_pruning() -> Any:
    """The ``torch_pruning`` module, imported here only (a benchmark extra, never a dependency)."""
    if importlib.util.find_spec("torch_pruning") is None:
        raise BenchError(f"torch-pruning is not installed; {INSTALL_HINT}")
    import torch_pruning

    return torch_pruning


def tp_prune(baseline: nn.Module, ratio: float, example: torch.Tensor, round_to: int) -> nn.Module:
    """A copy of ``baseline`` pruned by Torch-Pruning: group L1 magnitude, global, ``fc`` kept."""
    tp = _torch_pruning()
    model = copy.deepcopy(baseline).eval()
    pruner = tp.pruner.BasePruner(  # MetaPruner / MagnitudePruner are aliases in 1.6
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),  # mean reduction / normalizer
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=[model.fc],
        round_to=round_to if round_to > 1 else None,
    )
    pruner.step()
    return model


def tp_search(baseline: nn.Module, example: torch.Tensor, round_to: int,
              steps: int = 20) -> tuple[nn.Module, float, list[dict[str, float]]]:  # fmt: skip
    """Bisect Torch-Pruning's global ratio for the least pruning with FLOPs <= ``FLOPS_KEEP``.

    Returns:
        ``(pruned model, ratio, trace)``; trace holds every ``{"ratio", "flops_kept"}`` tried.
    """
    base_flops = count_flops(baseline, example)
    lo, hi, best, trace = 0.0, 0.95, None, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = tp_prune(baseline, mid, example, round_to)
        kept = count_flops(model, example) / base_flops
        trace.append({"ratio": mid, "flops_kept": kept})
        if kept <= FLOPS_KEEP:
            hi, best = mid, model
        else:
            lo = mid
    if best is None:
        best = tp_prune(baseline, hi, example, round_to)
        if count_flops(best, example) / base_flops > FLOPS_KEEP:
            raise BenchError(f"Torch-Pruning reached no FLOPs ratio <= {FLOPS_KEEP}")
    return best, hi, trace


def run_torch_pruning(baseline: nn.Module, splits: Splits, settings: Settings, seed: int,
                      out: Path, ev: Evaluator) -> dict[str, Any]:  # fmt: skip
    """Torch-Pruning at the same FLOPs ratio, then the same fine-tune (same loop and batches)."""
    tp = _torch_pruning()
    example = splits.eval_inputs[:1]
    start = time.perf_counter()
    model, ratio, trace = tp_search(baseline, example, settings.round_to)
    prune_seconds = time.perf_counter() - start
    pruned_correct = ev.correct(model)
    cfg = settings.train_config("finetune")
    batches = splits.batches(settings, seed)
    summary = train_model(model, batches, seed=seed, **cfg)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model, out / "model.pt")  # the whole module: its widths are not the zoo's
    macs = [tp.utils.count_ops_and_params(m, example)[0] for m in (baseline, model)]
    record = {
        "pruner": "torch_pruning.pruner.BasePruner (MetaPruner), GroupMagnitudeImportance(p=1, "
                  "group_reduction='mean', normalizer='mean'), global_pruning=True, "
                  "ignored_layers=[fc]",
        "version": _tp_version(),
        "pruning_ratio": ratio,
        "round_to": settings.round_to,
        "search": trace,
        "torch_pruning_macs_kept": macs[1] / macs[0],
        "pruned_correct": pruned_correct,
        "prune_seconds": prune_seconds,
        "train": train_record(cfg, summary["seconds"], summary["steps"], summary["final_loss"],
                              batches),
        "correct": ev.correct(model),
        "model_file": str(out / "model.pt"),
        "model_format": "torch.save(module)",
    }  # fmt: skip
    if settings.round_to > 1:  # the same pruning without rounding, for latency only
        unrounded, _, _ = tp_search(baseline, example, 1)
        torch.save(unrounded, out / "unrounded.pt")
        record["unrounded_file"] = str(out / "unrounded.pt")
    return record


def _tp_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


def load_arm_model(path: str, fmt: str) -> nn.Module:
    """An arm's model as written by its process (artifact, or a module saved in this run)."""
    if fmt == "artifact":
        return mp.load(path).eval()
    return torch.load(path, map_location="cpu", weights_only=False).eval()  # written by us


def run_arm(arm: str, args: argparse.Namespace, settings: Settings, baseline_path: str,
            work: Path) -> dict[str, Any]:  # fmt: skip
    """One arm from the saved baseline (runs in its own process with --jobs 2)."""
    torch.set_num_threads(args.threads)
    root = data_dir(args.data, require="cifar10")
    splits = load_splits(root, args.val, settings, args.seed)
    baseline = mp.load(baseline_path).eval()
    ev = Evaluator(splits)
    start = time.perf_counter()
    if arm == "torch-pruning":
        record = run_torch_pruning(baseline, splits, settings, args.seed, work / arm, ev)
    else:
        teacher = None
        if MODELPRESS_ARMS[arm].teachers > 1:  # more baselines, fine-tuned with the next seeds
            seeds = range(args.seed + 1, args.seed + MODELPRESS_ARMS[arm].teachers)
            extra = [run_baseline(splits, root, settings, s, work, ev)[0].eval() for s in seeds]
            teacher = [baseline, *extra]
        record = run_modelpress(baseline, splits, settings, arm, args.seed, work / arm, ev,
                                teacher)  # fmt: skip
    record |= {"seconds": time.perf_counter() - start, "eval_seconds": ev.seconds,
               "eval_images": ev.images}  # fmt: skip
    log(f"{arm}: {record['seconds']:.0f} s; {splits.split} accuracy after pruning "
        f"{100 * record['pruned_correct'] / ev.n:.2f} %, after fine-tuning "
        f"{100 * record['correct'] / ev.n:.2f} %")  # fmt: skip
    return record


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    d = Settings()
    p = base_parser(
        __doc__, "cifar10/ and resnet20-cifar10/", "<result name>/<arm> (with ONNX files)"
    )
    p.add_argument("--val", action="store_true", help="tuning run on 5,000 images held out of "
                   "the training set (test set untouched); writes *-val files")  # fmt: skip
    p.add_argument("--epochs", type=int, help=f"fine-tune epochs of every arm (default "
                   f"{d.finetune_epochs}; 1 with --quick)")  # fmt: skip
    p.add_argument("--lr", type=float, help=f"fine-tune peak lr (default {d.finetune_lr})")
    p.add_argument("--baseline-epochs", type=int, help=f"baseline fine-tune epochs (default "
                   f"{d.baseline_epochs}; 1 with --quick)")  # fmt: skip
    p.add_argument("--baseline-lr", type=float, help=f"baseline fine-tune peak lr (default "
                   f"{d.baseline_lr})")  # fmt: skip
    p.add_argument("--round-to", type=int, help=f"keep channel counts multiples of this in "
                   f"both libraries (default {d.round_to}; 1: off)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and "
                   "evaluation (default 1; see bench/README.md)")  # fmt: skip
    p.add_argument("--latency-threads", help="comma-separated thread counts for latency "
                   "(default 1,2; 1 with --quick)")  # fmt: skip
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated arms of "
                   f"{','.join(ARMS)} (default {','.join(DEFAULT_ARMS)})")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="run the arms in this "
                   "many processes (--threads each; default 2); latency is always measured "
                   "afterwards in the main process")  # fmt: skip
    p.add_argument("--tag", default="", help="suffix of the result name, e.g. for a sweep")
    p.add_argument("--remeasure", action="store_true", help="no training: time again the "
                   "models of the earlier run with the same options (its JSON in --out, its "
                   "models in --work) and write *-remeasured files")  # fmt: skip
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    """Defaults (or their --quick version) with the command-line overrides applied."""
    s = Settings().quick() if args.quick else Settings()
    overrides = {"finetune_epochs": args.epochs, "finetune_lr": args.lr,
                 "baseline_epochs": args.baseline_epochs, "baseline_lr": args.baseline_lr,
                 "round_to": args.round_to}  # fmt: skip
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if args.latency_threads:
        s = replace(s, latency_threads=tuple(int(t) for t in args.latency_threads.split(",")))
    return s


def check_arms(arms: list[str]) -> tuple[list[str], dict[str, str]]:
    """The arms that can run now, and a reason for each one skipped."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise BenchError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "torch-pruning" in arms:
        _torch_pruning()  # fail before any training when the extra is missing
    skipped = {}
    if not structured_available():
        for arm in [a for a in arms if a.startswith("modelpress")]:
            skipped[arm] = "prune.structured is not registered in this modelpress yet"
            log(f"skipping arm {arm}: {skipped[arm]}")
    return [a for a in arms if a not in skipped], skipped


def run_arms(arms: list[str], args: argparse.Namespace, settings: Settings, baseline_path: str,
             work: Path) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every arm, one after another or in ``--jobs`` processes (spawned: fresh torch state)."""
    return in_processes(run_arm, arms, args, settings, baseline_path, work, jobs=args.jobs)


def measure_models(
    baseline: nn.Module, records: dict[str, dict[str, Any]], splits: Splits, settings: Settings,
    work: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Describe every model and time it in both runtimes: ``(rows, latency)``.

    The models are the baseline, each arm's (reloaded from its file) and, where an arm wrote
    one, its un-rounded pruning (timed only)."""
    models = {"baseline": baseline}
    for arm, r in records.items():
        models[arm] = load_arm_model(r["model_file"], r["model_format"])
        if "unrounded_file" in r:
            models[f"{arm} (round_to 1, not fine-tuned)"] = load_arm_model(
                r["unrounded_file"], r["model_format"]
            )
    x = splits.eval_inputs[: max(settings.latency_batches)].contiguous()
    latency, exports = eager_and_ort_latency(
        models, x, work / "onnx", threads=settings.latency_threads,
        batches=settings.latency_batches, runs=settings.latency_runs,
        rounds=settings.latency_rounds, warmup=settings.latency_warmup,
    )  # fmt: skip
    example = splits.eval_inputs[:1]
    rows = {name: describe(m, example) | {"onnx": exports[name]} for name, m in models.items()}
    for arm, r in records.items():
        rows[arm] |= r
    return rows, latency


def run(args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    root = data_dir(args.data, require="cifar10")
    arms, skipped = check_arms([a for a in args.arms.split(",") if a])
    splits = load_splits(root, args.val, settings, args.seed)
    log(f"data: {len(splits.train_labels):,} training images decoded to uint8, "
        f"{len(splits.eval_labels):,} {splits.split} images, {splits.load_seconds:.0f} s")  # fmt: skip
    work = args.work / name
    ev = Evaluator(splits)
    baseline, base = run_baseline(splits, root, settings, args.seed, work, ev)
    records = run_arms(arms, args, settings, base["artifact"], work)
    log("latency ...")
    t_lat = time.perf_counter()
    rows, latency = measure_models(baseline, records, splits, settings, work)
    rows["baseline"] |= base
    data = {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "evaluation_split": "validation (held-out training images)" if args.val else "test",
        "data": splits.spec,
        "train_images": len(splits.train_labels),
        "evaluation_images": len(splits.eval_labels),
        "load_seconds": splits.load_seconds,
        "decode_seconds_per_image": splits.decode_seconds_per_image,
        "settings": asdict(settings),
        "target": {"max_accuracy_drop_pp": TARGET_DROP_PP, "min_speedup": TARGET_SPEEDUP,
                   "flops_kept_at_most": FLOPS_KEEP},
        "onnx": {"exporter": exporter_name(), "onnxruntime": _ort_version(),
                 "provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL"},
        "skipped_arms": skipped,
        "models": rows,
        "latency": latency,
        "latency_seconds": time.perf_counter() - t_lat,
        "main_eval_seconds": ev.seconds,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    add_ratios(data)
    data["estimate_full_run"] = estimate_full_run(data, args)
    return data


def remeasure(args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """The earlier run ``name``'s results with every model timed again (no training): the
    accuracies and models stay, latency, speedups and verdicts are new.

    Raises:
        BenchError: that run's JSON or one of its model files is missing.
    """
    t0 = time.perf_counter()
    path = args.out / f"{name}.json"
    if not path.is_file():
        raise BenchError(f"--remeasure: no earlier result {path}; run the benchmark with the "
                         "same options first (or point --out at its results)")  # fmt: skip
    data = json.loads(path.read_text(encoding="utf-8"))
    earlier = data.pop("run")
    models = data["models"]
    files = [models["baseline"]["artifact"]]
    files += [m[k] for m in models.values() for k in ("model_file", "unrounded_file") if k in m]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise BenchError(f"--remeasure: {missing[0]} is gone; rerun the benchmark without "
                         "--remeasure to rebuild its models")  # fmt: skip
    splits = load_splits(data_dir(args.data, require="cifar10"), args.val, settings, args.seed)
    log("latency ...")
    baseline = mp.load(models["baseline"]["artifact"]).eval()
    records = {arm: m for arm, m in models.items() if "model_file" in m}
    rows, latency = measure_models(baseline, records, splits, settings, args.work / name)
    for model, row in rows.items():
        models[model]["onnx"] = row["onnx"]
    data |= {
        "settings": asdict(settings),
        "latency": latency,
        "latency_seconds": time.perf_counter() - t0,
        "remeasured_from": {k: earlier[k] for k in ("command", "git_commit", "date")},
        "seconds": time.perf_counter() - t0,
    }
    add_ratios(data)
    return data


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def add_ratios(data: dict[str, Any]) -> None:
    """Accuracy, Δ pp, FLOPs kept / ratio, speedups and the target verdict of every model."""
    n, models = data["evaluation_images"], data["models"]
    base = models["baseline"]
    first = f"threads_{data['settings']['latency_threads'][0]}"
    for name, m in models.items():
        m["flops_kept"] = m["flops"] / base["flops"]
        m["flops_ratio"] = base["flops"] / m["flops"]
        m["params_ratio"] = base["params"] / m["params"]
        if "correct" in m:
            m["accuracy_pct"] = 100 * m["correct"] / n
            m["delta_pp"] = 100 * (m["correct"] - base["correct"]) / n
        speedups: dict[str, dict[str, float]] = {}
        for threads, per_model in data["latency"].items():
            for runtime, entry in per_model[name].items():
                ref = per_model["baseline"][runtime]
                for b in data["settings"]["latency_batches"]:
                    speedups.setdefault(threads, {})[f"{runtime}_b{b}"] = speedup(ref, entry, b)
        m["speedup"] = speedups
        if name != "baseline" and "delta_pp" in m:
            m["verdict"] = verdict(m, speedups[first])


def verdict(m: dict[str, Any], speedups: dict[str, float]) -> dict[str, Any]:
    """Whether a model meets the target, per runtime, at the first latency thread count."""
    acc_ok = m["delta_pp"] >= -TARGET_DROP_PP - 1e-9
    out: dict[str, Any] = {"accuracy_ok": acc_ok}
    for runtime in ("eager", "ort"):
        slow = {k: v for k, v in speedups.items() if k.startswith(runtime) and v < TARGET_SPEEDUP}
        out[f"{runtime}_speed_ok"] = not slow
        out[f"{runtime}_short"] = slow
        out[f"met_{runtime}"] = acc_ok and not slow
    out["met"] = out["met_eager"] and out["met_ort"]
    return out


def estimate_full_run(data: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Seconds a full run with the default settings would take, from the rates measured here
    (steady-state training steps, evaluation and latency time scaled to the full sizes)."""
    full, s, models = Settings(), data["settings"], data["models"]
    n_train = 50_000 - (VAL_SIZE if args.val else 0)
    eval_scale = (VAL_SIZE if args.val else 10_000) / data["evaluation_images"]
    out = {"load_seconds": data["load_seconds"] + 50_000 * data["decode_seconds_per_image"]}
    epoch = {name: n_train * m["train"]["seconds_per_image"] for name, m in models.items()
             if "train" in m}  # fmt: skip
    out |= {f"{name}_epoch_seconds": t for name, t in epoch.items()}
    out["baseline_seconds"] = (full.baseline_epochs * epoch["baseline"]
                               + data["main_eval_seconds"] * eval_scale)  # fmt: skip
    arms = [name for name in epoch if name != "baseline"]
    for name in arms:
        m = models[name]
        out[f"{name}_seconds"] = (full.finetune_epochs * epoch[name] + m["prune_seconds"]
                                  + m["eval_seconds"] * eval_scale)  # fmt: skip

    def timed_runs(runs: int, rounds: int, warmup: int, threads: Sequence[int]) -> int:
        return (runs + rounds * warmup) * len(threads)

    lat_scale = timed_runs(
        full.latency_runs, full.latency_rounds, full.latency_warmup, full.latency_threads
    ) / timed_runs(
        s["latency_runs"], s["latency_rounds"], s["latency_warmup"], s["latency_threads"]
    )
    out["latency_seconds"] = data["latency_seconds"] * lat_scale
    fixed = out["load_seconds"] + out["baseline_seconds"] + out["latency_seconds"]
    per_arm = [out[f"{a}_seconds"] for a in arms]
    out["total_seconds_jobs_1"] = fixed + sum(per_arm)
    workers = [0.0, 0.0]  # the pool hands each arm, in order, to the first free process
    for t in per_arm:
        workers[workers.index(min(workers))] += t + out["load_seconds"]
    out["total_seconds_jobs_2"] = fixed + max(workers)
    return out


# --------------------------------------------------------------------------- report


def _x(v: float) -> str:
    return f"{v:.2f}×"


def _results_table(data: dict[str, Any], threads: str) -> str:
    rows = []
    for name, m in data["models"].items():
        sp = m["speedup"][threads]
        acc = f"{m['accuracy_pct']:.2f}" if "accuracy_pct" in m else "—"
        delta = "—" if name == "baseline" or "delta_pp" not in m else f"{m['delta_pp']:+.2f}"
        met = "—"
        if "verdict" in m:
            v = m["verdict"]
            met = (
                "**yes**"
                if v["met"]
                else ("ORT only" if v["met_ort"] else ("eager only" if v["met_eager"] else "no"))
            )
        rows.append([
            name, acc, delta, f"{m['params']:,}", f"{m['flops'] / 1e6:.1f}",
            f"{m['flops_kept']:.3f} ({_x(m['flops_ratio'])})",
            _x(sp["eager_b1"]), _x(sp["eager_b64"]), _x(sp["ort_b1"]), _x(sp["ort_b64"]), met,
        ])  # fmt: skip
    split = "test" if data["evaluation_split"] == "test" else "val"
    headers = ["model", f"{split} accuracy %", "Δ pp", "params", "MFLOPs",
               "FLOPs kept (ratio)", "eager b1", "eager b64", "ORT b1", "ORT b64",
               "target met"]  # fmt: skip
    return markdown_table(headers, rows, align="lrrrrrrrrrc")


def _latency_table(data: dict[str, Any], threads: str) -> str:
    rows = []
    for name, per in data["latency"][threads].items():
        cells = [name]
        for runtime in ("eager", "ort"):
            for b in data["settings"]["latency_batches"]:
                e = per[runtime]
                cells.append(f"{e[f'b{b}_median_ms']:.2f} ({e[f'b{b}_min_round_ms']:.2f}–"
                             f"{e[f'b{b}_max_round_ms']:.2f})")  # fmt: skip
        rows.append(cells)
    bs = data["settings"]["latency_batches"]
    headers = ["model", *[f"{r} b{b} ms" for r in ("eager", "ORT") for b in bs]]
    return markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))


def _details_table(data: dict[str, Any]) -> str:
    n, rows = data["evaluation_images"], []
    for name, m in data["models"].items():
        if "train" not in m or name == "baseline":
            continue
        widths = "/".join(str(w) for w in m["conv_out_channels"].values())
        rows.append([name, f"{100 * m['pruned_correct'] / n:.2f}", f"{m['accuracy_pct']:.2f}",
                     f"{m['train']['seconds']:.0f}", f"{m['state_dict_bytes']:,}",
                     f"{m.get('artifact_bytes', '—'):,}" if "artifact_bytes" in m else "—",
                     widths])  # fmt: skip
    headers = [
        "arm",
        "accuracy after pruning %",
        "after fine-tune %",
        "fine-tune s",
        "fp32 state_dict bytes",
        "artifact bytes",
        "conv output channels (in order)",
    ]
    return markdown_table(headers, rows, align="lrrrrrl")


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report."""
    quick = data["mode"] == "quick"
    val = data["evaluation_split"] != "test"
    title = "# Structured pruning of ResNet-20 on CIFAR-10 (JPEG) to half the FLOPs"
    title += " (quick smoke run)" if quick else ""
    title += " — validation run (for tuning; not the reported result)" if val else ""
    if "remeasured_from" in data:
        r = data["remeasured_from"]
        title += (
            f"\n\nLatency re-measured without training (`--remeasure`): the models and "
            f"accuracies are those of the run of {r['date']} (commit `{r['git_commit'][:7]}`, "
            f"`{r['command']}`)."
        )
    s, base = data["settings"], data["models"]["baseline"]
    threads = [f"threads_{t}" for t in s["latency_threads"]]
    parts = [
        title,
        f"Target: **≤ {TARGET_DROP_PP} pp accuracy loss and ≥ {TARGET_SPEEDUP}× measured CPU "
        f"speedup at batch 1 and batch 64**, at ≤ {FLOPS_KEEP} of the baseline's FLOPs; "
        "judged per runtime (torch eager, onnxruntime) at "
        f"{s['latency_threads'][0]} thread(s).",
        "\n".join(_verdict_lines(data)),
        f"## Results ({s['latency_threads'][0]} thread)",
        _results_table(data, threads[0]),
    ]
    for t in threads[1:]:
        parts += [f"## Speedups at {t.removeprefix('threads_')} threads",
                  _results_table(data, t)]  # fmt: skip
    for t in threads:
        parts += [f"### Latency at {t.removeprefix('threads_')} thread(s), median ms "
                  "(lowest–highest round median)", _latency_table(data, t)]  # fmt: skip
    parts += [
        "## Arms",
        _details_table(data),
        _setup_text(data, base),
        "## Run",
        run_info_markdown(info),
    ]
    if data["skipped_arms"]:
        parts.insert(3, "Skipped: " + "; ".join(f"`{a}` ({r})" for a, r in
                                                data["skipped_arms"].items()))  # fmt: skip
    return "\n\n".join(parts)


def _verdict_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for name, m in data["models"].items():
        if "verdict" not in m:
            continue
        v, bits = m["verdict"], []
        bits.append(f"{m['delta_pp']:+.2f} pp ({'ok' if v['accuracy_ok'] else 'too much'})")
        for runtime, label in (("eager", "eager"), ("ort", "ORT")):
            short = ", ".join(
                f"{k.split('_')[1]} {_x(x)}" for k, x in v[f"{runtime}_short"].items()
            )
            bits.append(f"{label} {'ok' if not short else 'short: ' + short}")
        lines.append(f"- **{name}: {'met' if v['met'] else 'not met'}** — " + "; ".join(bits))
    return lines


def _setup_text(data: dict[str, Any], base: dict[str, Any]) -> str:
    s = data["settings"]
    bt, n_eval = base["train"], data["evaluation_images"]
    onnx = data["onnx"]
    return (
        f"Baseline: Distiller's ResNet-20 checkpoint ({100 * base['checkpoint_correct'] / n_eval:.2f} % "
        f"on this split before fine-tuning) fine-tuned {bt['epochs']} epoch(s) on "
        f"{data['train_images']:,} JPEG training images (SGD momentum {s['momentum']}, lr "
        f"{bt['lr']}, cosine, weight decay {s['weight_decay']}, batch {s['batch_size']}, "
        f"{bt['seconds']:.0f} s){reuse_note(base)}. Every arm then prunes to ≤ {FLOPS_KEEP} "
        "of its FLOPs (channel "
        f"counts multiples of {s['round_to']}) and fine-tunes {s['finetune_epochs']} epoch(s) "
        f"(SGD momentum {s['momentum']}, lr {s['finetune_lr']}, cosine, weight decay "
        f"{s['weight_decay']}) in the same loop (`modelpress.train.fit`) on the same "
        "augmented batches (random crop of the 4-pixel zero-padded image, horizontal flip; "
        "same seed, same order). FLOPs are `modelpress.measure.count_flops` (torch's "
        "FlopCounterMode: 2 per multiply-accumulate) for every model. Latency: torch eager and "
        f"onnxruntime {onnx['onnxruntime']} ({onnx['provider']}, {onnx['graph_optimization']}, "
        f"sequential) on an ONNX file exported with the {onnx['exporter']} exporter (checked "
        "against eager), median of round medians over "
        f"{s['latency_runs']} runs in {s['latency_rounds']} rounds that alternate between all "
        f"models and runtimes ({s['latency_warmup']} warm-up runs per round), one batch size "
        "per round; speedup = the median over rounds of the baseline's round median / the "
        "model's (a paired ratio). The `round_to 1, not fine-tuned` rows are the same "
        "pruning without rounding the channel counts, timed only (their accuracy is not "
        "measured): they show what the rounding is for."
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``<out>/structured_cifar[-val][-quick].{json,md}``."""
    args = parse_args(argv)
    settings = make_settings(args)
    name = result_name(NAME, args)
    info = run_info(__file__, argv,
                    threads={"train": args.threads, "processes": args.jobs,
                             **{f"latency_{t}": t for t in settings.latency_threads}})  # fmt: skip
    if args.remeasure:
        data = remeasure(args, settings, name)
        return finish(f"{name}-remeasured", args, info, data, markdown, "\n\n## Arms")
    data = run(args, settings, name)
    est = data["estimate_full_run"]
    log("estimated full run: " + ", ".join(f"{k} {v:.0f}" for k, v in est.items()))
    return finish(name, args, info, data, markdown, "\n\n## Arms")


if __name__ == "__main__":
    main_guard(main)
