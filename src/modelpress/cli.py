"""The ``modelpress`` command line (typer). Every user error: exit code 2 and one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from modelpress.artifact.save import check_destination
from modelpress.errors import ModelpressError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress trained PyTorch models, with measured bytes, latency and accuracy.",
    epilog="Example: modelpress demo  (then: modelpress inspect runs/demo)",
)
out = Console()
err = Console(stderr=True)
if not out.is_terminal:  # piped or captured: wide enough for the stage table
    out.width = 120

DataOpt = Annotated[
    str, typer.Option("--data", "-d", help="Data spec: digits, mnist:DIR, npz:FILE.")
]
SeedOpt = Annotated[int, typer.Option(help="Seed for everything random.")]


def _model_for(spec: str, bundle: Any, seed: int = 0) -> Any:
    """The model ``spec`` names, built for the data's input shape and classes if it asks
    (a freshly built model is initialised from ``seed``)."""
    import torch

    from modelpress.models import load_model, shape_kwargs

    if spec.startswith(("zoo:", "import:")):
        torch.manual_seed(seed)
        kwargs = {"input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes}
        return load_model(spec, **shape_kwargs(spec, kwargs))
    return load_model(spec)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to save the artifact.")] = Path(
        "runs/demo"
    ),
    seed: SeedOpt = 0,
) -> None:
    """Train a small MLP on scikit-learn's digits, compress it, save, reload, compare.

    Example: modelpress demo
    """
    import torch

    import modelpress as mp
    from modelpress.measure import accuracy, directory_bytes
    from modelpress.train import train_model

    torch.set_num_threads(1)  # a 17k-parameter MLP: one thread is fastest
    check_destination(out_dir)
    bundle = mp.load_data("digits")
    out.print("[bold]1.[/] training zoo:mlp on digits (1,437 train / 360 held-out test images)")
    model = _model_for("zoo:mlp", bundle, seed)
    train_model(model, bundle, epochs=20, lr=3e-3, seed=seed, progress=True)
    recipe = mp.Recipe.builtin("demo")
    out.print(f"[bold]2.[/] compressing with recipe '{recipe.name}': {recipe.description}")
    result = mp.compress(model, recipe, data=bundle, seed=seed, progress=True)
    path = result.save(out_dir)
    out.print(result.rich_table())
    reloaded = mp.load(path)
    acc = accuracy(reloaded, bundle.loader("test", 256))
    before = result.final["eval"]["accuracy"]
    out.print(f"[bold]3.[/] saved {path} ({directory_bytes(path):,} bytes on disk)")
    same = "identical" if acc == before else "DIFFERENT"
    out.print(f"    reloaded accuracy {acc:.4f} vs in-memory {before:.4f}: {same}")
    if acc != before:
        raise typer.Exit(1)


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="Model spec, e.g. zoo:lenet-300-100.")],
    data: DataOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Artifact directory to write.")],
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    optimizer: Annotated[str, typer.Option(help="adam, adamw or sgd.")] = "adam",
    seed: SeedOpt = 0,
) -> None:
    """Train a model into a baseline artifact (no compression stages).

    Example: modelpress train zoo:lenet-300-100 --data mnist:~/data/mnist --out runs/lenet
    """
    import modelpress as mp
    from modelpress.measure import accuracy
    from modelpress.train import train_model

    check_destination(out_dir)
    bundle = mp.load_data(data)
    net = _model_for(model, bundle, seed)
    summary = train_model(net, bundle, epochs=epochs, lr=lr, batch_size=batch_size,
                          optimizer=optimizer, seed=seed, progress=True)  # fmt: skip
    acc = accuracy(net, bundle.loader("test", 256))
    extra = {"metrics": {"baseline": {"eval": {"accuracy": acc}}}, "training": summary}
    path = mp.save(net, out_dir, extra=extra)
    out.print(f"accuracy: {acc:.4f}  (test split of {data}; {summary['steps']} steps)")
    out.print(f"saved {path}")


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="Model spec or artifact directory.")],
    data: DataOpt,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe or YAML file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Artifact directory to write.")],
    seed: SeedOpt = 0,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per latency (0: skip).")] = 20,
) -> None:
    """Run a recipe on a model, print baseline vs each stage, save the artifact.

    Example: modelpress compress runs/lenet --data mnist:~/data/mnist --recipe
    prune-finetune-int4 --out runs/lenet-int4
    """
    import modelpress as mp

    check_destination(out_dir)
    the_recipe = mp.Recipe.resolve(recipe)
    bundle = mp.load_data(data)
    net = _model_for(model, bundle, seed)
    result = mp.compress(net, the_recipe, data=bundle, seed=seed, latency_runs=latency_runs,
                         progress=True)  # fmt: skip
    path = result.save(out_dir)
    out.print(result.rich_table())
    out.print(f"saved {path}")


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="Artifact directory.")]) -> None:
    """Per-tensor layout, value encoding, nonzeros and bytes of an artifact.

    Example: modelpress inspect runs/demo
    """
    from modelpress.report.inspect import inspect_table

    out.print(inspect_table(path))


@app.command(name="eval")
def evaluate(
    path: Annotated[str, typer.Argument(help="Artifact directory or model spec.")],
    data: DataOpt,
) -> None:
    """Top-1 accuracy of a model on the held-out split of the data.

    Example: modelpress eval runs/demo --data digits
    """
    import modelpress as mp
    from modelpress.measure import accuracy

    bundle = mp.load_data(data)
    acc = accuracy(_model_for(path, bundle), bundle.loader("test", 256))
    out.print(f"accuracy: {acc:.4f}")


@app.command()
def bench(
    path: Annotated[Path, typer.Argument(help="Artifact directory.")],
    batch_size: Annotated[int, typer.Option(help="Samples per call.")] = 1,
    seq_len: Annotated[int, typer.Option(help="Tokens per sample (token models).")] = 128,
    threads: Annotated[int, typer.Option(help="Intra-op threads, torch and onnxruntime.")] = 1,
    runs: Annotated[int, typer.Option(help="Timed calls per row (median reported).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed calls first.")] = 3,
    input_shape: Annotated[
        str | None, typer.Option(help="One sample's shape, e.g. 1,8,8, if not recorded.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Latency of torch fp32 (uncompressed) vs the compressed model on onnxruntime, same run.

    Example: modelpress bench runs/demo --batch-size 8 --runs 50
    """
    import json

    from modelpress.runtime.bench import bench_artifact, bench_table

    shape = _shape(input_shape)
    with err.status(f"exporting {path} to ONNX and timing 4 configurations"):
        report = bench_artifact(path, batch_size=batch_size, seq_len=seq_len, threads=threads,
                                runs=runs, warmup=warmup, input_shape=shape)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))  # plain: never wrapped
    else:
        out.print(bench_table(report))


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="Artifact directory.")],
    dest: Annotated[Path, typer.Argument(help="The .onnx file to write (replaced if present).")],
    mode: Annotated[
        str, typer.Option(help="quant (integer ops), fp32 (all baked to float) or fp16.")
    ] = "quant",
    opset: Annotated[int, typer.Option(help="ONNX opset of the default domain, 17..20.")] = 17,
    seq_len: Annotated[
        int, typer.Option(help="Tokens per sample of the tracing input (token models).")
    ] = 128,
    input_shape: Annotated[
        str | None, typer.Option(help="One sample's shape, e.g. 1,8,8, if not recorded.")
    ] = None,
) -> None:
    """Write an artifact as an ONNX file for onnxruntime, batch axis dynamic.

    Example: modelpress export runs/demo runs/demo.onnx
    """
    from collections import Counter

    from modelpress.errors import ConfigError
    from modelpress.runtime.bench import artifact_inputs
    from modelpress.runtime.export import export_onnx

    if dest.is_dir():
        raise ConfigError(f"{dest} is a directory; give the file to write, e.g. {dest}/model.onnx.")
    model, _, inputs = artifact_inputs(path, batch_size=1, seq_len=seq_len,
                                       input_shape=_shape(input_shape))  # fmt: skip
    result = export_onnx(model, inputs, dest, mode=mode, opset=opset)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(result.layers.values()).items()))
    out.print(f"wrote {result.path}: {result.bytes:,} bytes ({mode}"
              f"{'; ' + kinds + ' layers' if kinds else ''})")  # fmt: skip


def _shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 1,8,8`` as a tuple (None when not given).

    Raises:
        ConfigError: not integers separated by commas.
    """
    from modelpress.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--input-shape must be integers separated by commas (e.g. 1,8,8); got {text!r}."
        ) from None


@app.command()
def techniques() -> None:
    """List registered techniques with each config field, its default and meaning.

    Example: modelpress techniques
    """
    from modelpress.config import describe_field
    from modelpress.registry import get_technique, technique_names

    for name in technique_names():
        spec = get_technique(name)
        needs = f" (needs {', '.join(sorted(spec.needs))})" if spec.needs else ""
        out.print(f"[bold]{name}[/]{needs}: {spec.summary}")
        for field, info in spec.config_cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            out.print(f"    {field} = {default!r}: {describe_field(info)}. {info.description or ''}",
                      highlight=False, markup=False)  # fmt: skip


@app.command()
def recipes(
    show: Annotated[str | None, typer.Option(help="Print this recipe's YAML.")] = None,
) -> None:
    """List the built-in recipes (or print one as YAML with --show NAME).

    Example: modelpress recipes --show prune-finetune-int4
    """
    from modelpress.recipe import Recipe, builtin_recipes

    if show:
        out.print(Recipe.builtin(show).to_yaml(), highlight=False, markup=False)
        return
    for name in builtin_recipes():
        out.print(f"[bold]{name}[/]: {Recipe.builtin(name).description}")


def main() -> None:
    """Entry point: run the app; a modelpress error becomes one line and exit code 2.

    typer's standalone mode handles usage errors (exit 2) and ``typer.Exit`` codes itself;
    modelpress errors raised inside a command reach this function.
    """
    try:
        app()
    except ModelpressError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
