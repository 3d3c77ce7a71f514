"""``compress()``: copy the model, measure it, run each stage, measure after each stage.

The original model is never changed: it is the baseline and the default teacher. Every
size is the bytes of an artifact actually written (to a temporary directory); every
latency is measured on the baked model in the same run as the baseline's.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from rich.console import Console
from torch import nn

from modelpress.artifact import save_artifact
from modelpress.context import Batch, Context, Evaluate, LossFn, batch_inputs, classification_loss
from modelpress.data import DataBundle, load_data
from modelpress.errors import ConfigError, DataError
from modelpress.measure import (
    accuracy_evaluator,
    count_flops,
    count_nonzeros,
    count_params,
    directory_bytes,
    measure_latency,
    state_dict_bytes,
)
from modelpress.parametrizations import baked_copy
from modelpress.recipe import Recipe, Stage
from modelpress.registry import get_technique
from modelpress.result import Result, StageRecord
from modelpress.techniques.distillation.ensemble import as_teacher


def _as_recipe(recipe: Recipe | str | Sequence[Stage | dict[str, Any]]) -> Recipe:
    """A recipe from a Recipe, a name or YAML path, or a list of stages or stage dicts."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return Recipe.resolve(recipe)
    stages = list(recipe)
    if not stages or not all(isinstance(s, (Stage, dict)) for s in stages):
        raise ConfigError(
            "recipe must be a Recipe, a recipe name or YAML path, or a list of stages "
            '(Stage or {"technique": ..., **config}).'
        )
    dicts = [s.to_dict() if isinstance(s, Stage) else s for s in stages]
    return Recipe.from_dict({"stages": dicts})


def _first_inputs(batches: Iterable[Batch]) -> Any:
    for batch in batches:
        x = batch_inputs(batch)
        if isinstance(x, dict):
            return {k: v[:1] for k, v in x.items()}
        return x[:1]
    raise DataError("the data yields no batches.")


def _check_needs(recipe: Recipe, ctx: Context) -> None:
    for i, stage in enumerate(recipe.stages, 1):
        needs = get_technique(stage.technique).needs
        later = [s.technique for s in recipe.stages[i:]]
        if "later_train" in needs and "train" not in later:
            raise ConfigError(
                f"stage {i} ({stage.technique}) acts during training: put a 'train' stage "
                "after it in the recipe."
            )
        if needs & {"training", "calibration"} and not ctx.has_data():
            kind = "training" if "training" in needs else "calibration"
            raise DataError(
                f"stage {i} ({stage.technique}) needs {kind} data; pass data=... "
                "(CLI: --data digits)."
            )


def measure_model(model: nn.Module, ctx: Context, latency_runs: int) -> dict[str, Any]:
    """Evaluator metrics, params, nonzeros, FLOPs, artifact bytes and latency of ``model``."""
    metrics: dict[str, Any] = {}
    if ctx.evaluate is not None:
        metrics["eval"] = {k: float(v) for k, v in ctx.evaluate(model).items()}
    metrics["params"] = count_params(model)
    metrics["nonzeros"] = count_nonzeros(model)
    if ctx.example_inputs is not None:
        metrics["flops"] = count_flops(model, ctx.example_inputs)
    with tempfile.TemporaryDirectory(prefix="modelpress-size-") as tmp:
        metrics["bytes"] = directory_bytes(save_artifact(model, f"{tmp}/artifact"))
    if latency_runs and ctx.example_inputs is not None:
        baked = baked_copy(model)
        lat = measure_latency(baked, ctx.example_inputs, runs=latency_runs, warmup=3, threads=1)
        metrics["latency_ms"] = lat.median_ms
    return metrics


def make_context(
    model: nn.Module,
    data: DataBundle | str | Iterable[Batch] | None,
    evaluate: Evaluate | None,
    example_inputs: Any,
    teacher: nn.Module | Sequence[nn.Module] | None,
    loss_fn: LossFn | None,
    seed: int,
    progress: bool,
) -> Context:
    """The stage context: data (a spec is loaded), default evaluator and example inputs."""
    teacher = as_teacher(teacher)
    bundle = load_data(data) if isinstance(data, str) else data
    is_bundle = isinstance(bundle, DataBundle)
    ctx = Context(
        data=bundle if is_bundle else None,
        batches=None if is_bundle else bundle,
        teacher=teacher if teacher is not None else model,
        original=model,
        evaluate=evaluate,
        example_inputs=example_inputs,
        seed=seed,
        progress=progress,
        loss_fn=loss_fn or classification_loss,
    )
    if ctx.data is not None:
        ctx.evaluate = evaluate or accuracy_evaluator(ctx.data.loader("test", batch_size=256))
        if example_inputs is None:
            ctx.example_inputs = ctx.data.test.tensors[0][:1]
    elif example_inputs is None and ctx.batches is not None:
        ctx.example_inputs = _first_inputs(ctx.batches)
    return ctx


def compress(
    model: nn.Module,
    recipe: Recipe | str | Sequence[Stage | dict[str, Any]],
    *,
    data: DataBundle | str | Iterable[Batch] | None = None,
    evaluate: Evaluate | None = None,
    example_inputs: Any = None,
    teacher: nn.Module | Sequence[nn.Module] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    latency_runs: int = 20,
    progress: bool = False,
) -> Result:
    """Run ``recipe`` on a copy of ``model`` and measure the baseline and every stage.

    Args:
        model: the trained model; it is copied, never changed.
        recipe: a :class:`Recipe`, a built-in recipe name, a YAML path, or a list of stages.
        data: a data spec (``"digits"``), a :class:`DataBundle`, or re-iterable batches
            (a DataLoader) for training and calibration.
        evaluate: ``evaluate(model) -> {"metric": value}`` on held-out data; defaults to
            top-1 accuracy on the bundle's test split.
        example_inputs: inputs for FLOPs and latency; defaults to one test sample.
        teacher: the teacher for distillation; defaults to the original model. A list of
            models is an ensemble teacher: the mean of their logits
            (:class:`modelpress.techniques.distillation.ensemble.LogitEnsemble`).
        loss_fn: ``loss_fn(outputs, batch)`` for training; defaults to cross-entropy.
        seed: seeds everything random; the same seed gives the same artifact bytes.
        latency_runs: timed runs per latency measurement (0 skips latency).
        progress: show progress.

    Returns:
        A :class:`Result` with the compressed model, baseline and per-stage metrics.

    Raises:
        ConfigError, DataError, NoMatchingModulesError, UnsupportedModuleError: bad input,
            found before or during the stage that meets it; the input model is unchanged.
    """
    recipe = _as_recipe(recipe)
    ctx = make_context(model, data, evaluate, example_inputs, teacher, loss_fn, seed, progress)
    _check_needs(recipe, ctx)
    console = Console(stderr=True, quiet=not progress)
    torch.manual_seed(seed)
    work = copy.deepcopy(model)
    baseline = measure_model(model, ctx, latency_runs)
    baseline["bytes"] = state_dict_bytes(model)
    result = Result(model=work, recipe=recipe, baseline=baseline)
    for i, stage in enumerate(recipe.stages, 1):
        ctx.stage_index, ctx.reports = i, {}
        spec = get_technique(stage.technique)
        start = time.perf_counter()
        work = spec.apply(work, stage.config, ctx)
        seconds = time.perf_counter() - start
        metrics = measure_model(work, ctx, latency_runs)
        config = stage.config.model_dump(mode="json")
        result.stages.append(
            StageRecord(stage.technique, config, dict(ctx.reports), metrics, seconds)
        )
        console.print(f"[{i}/{len(recipe.stages)}] {stage.technique} done in {seconds:.1f}s")
    result.model = work.eval()
    return result
