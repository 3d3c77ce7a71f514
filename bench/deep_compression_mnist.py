"""Deep Compression (Han, Mao, Dally 2016) reproduced on MNIST: LeNet-300-100 and LeNet-5.

Run from the repository root::

    python bench/deep_compression_mnist.py           # the real benchmark (~25 min on 2 cores)
    python bench/deep_compression_mnist.py --quick   # smoke run: fewer images and epochs
    python bench/deep_compression_mnist.py --val     # tuning run on 5,000 held-out training
                                                     # images (the test set is never used)

Per network, a dense baseline is trained, then one ``modelpress.compress`` recipe runs the
paper's pipeline, with distillation from the dense baseline in both fine-tunes:

1. ``prune.gradual`` (global magnitude, cubic ramp) + ``distill.kd`` + ``train``;
2. ``share.kmeans`` (linear initialisation; bits per layer type as in the paper's LeNet rows)
   + ``distill.kd`` + ``train`` (codebook fine-tuning: indices fixed, centroids learn);
3. ``encode.huffman``, then ``encode.ans`` (lossless: entropy coding of every integer payload —
   cluster indices and sparse-index gaps).

The size is the whole artifact directory (``manifest.json`` + ``tensors.safetensors``) against
the fp32 ``torch.save(state_dict)`` file of the baseline, measured after every stage (the
paper's per-stage table). The final model is saved three times — bit-packed, Huffman- and
ANS-coded — and each is reloaded: test error (equal for all three: the coding is lossless),
time to load, and per tensor the symbols, their empirical entropy and the coded bits per
symbol (stream + coding table). Targets: **≥ 50× smaller at ≤ 0.1 pp more test error for both
networks** (paper: 40× and 39×); ANS within 2 % of the entropy and Huffman within H + 1 bit.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import modelpress as mp
from modelpress.artifact.packing import EntropyCoding, set_entropy_coding
from modelpress.measure import count_nonzeros, count_params, directory_bytes, state_dict_bytes
from modelpress.report.inspect import entropy_rows
from modelpress.train import train_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    adam,
    base_parser,
    data_dir,
    error_pct,
    finish,
    in_processes,
    log,
    main_guard,
    markdown_table,
    mnist_bundle,
    result_name,
    run_info,
    run_info_markdown,
)

NAME = "deep_compression_mnist"
TARGET_RATIO, TARGET_ERROR_PP = 50.0, 0.1
ANS_SLACK, HUFFMAN_SLACK_BITS = 0.02, 1.0
ANS_END_BITS = 64  # the ANS coder's final state: a constant per stream, not a rate
TRAIN_THREADS = 1
CODINGS = ("bitpack", "huffman", "ans")
PAPER = {"lenet-300-100": 40.0, "lenet5": 39.0}


@dataclass(frozen=True)
class Net:
    """One network's settings: the dense baseline, the pruning and the sharing."""

    spec: str
    baseline: tuple[int, float]  # epochs, lr (Adam, cosine)
    prune_finetune: tuple[int, float]
    sparsity: float
    layer_bits: dict[str, int]  # share.kmeans bits per module type
    codebook_finetune: tuple[int, float]


@dataclass(frozen=True)
class Settings:
    """Every hyperparameter of the benchmark (see bench/README.md for how they were chosen)."""

    nets: dict[str, Net] = field(
        default_factory=lambda: {
            "lenet-300-100": Net("zoo:lenet-300-100", (20, 2e-3), (20, 2e-3), 0.95,
                                 {"Linear": 5}, (3, 1e-4)),
            "lenet5": Net("zoo:lenet5", (6, 1e-3), (6, 1e-3), 0.96,
                          {"Conv2d": 8, "Linear": 6}, (3, 1e-4)),
        }
    )  # fmt: skip
    train_samples: int | None = None  # None: all 60,000 training images
    temperature: float = 4.0  # distill.kd defaults, as in recipe_mnist
    alpha: float = 0.9
    gradual_frequency: int = 100
    load_runs: int = 7

    def quick(self) -> Settings:
        """The smoke-run version: 6,000 images, one or two epochs per training."""
        nets = {k: replace(n, baseline=(1, n.baseline[1]), prune_finetune=(2, n.prune_finetune[1]),
                           codebook_finetune=(1, n.codebook_finetune[1]))
                for k, n in self.nets.items()}  # fmt: skip
        return replace(self, nets=nets, train_samples=6_000, gradual_frequency=5, load_runs=3)

    def recipe(self, key: str) -> mp.Recipe:
        """Prune → distill + train → share → distill + train → Huffman → ANS."""
        net = self.nets[key]
        kd = mp.Stage.of("distill.kd", temperature=self.temperature, alpha=self.alpha)
        stages = [
            mp.Stage.of("prune.gradual", sparsity=net.sparsity, scope="global",
                        end_fraction=0.6, frequency=self.gradual_frequency),
            kd, mp.Stage.of("train", **adam(*net.prune_finetune)),
            mp.Stage.of("share.kmeans", bits=max(net.layer_bits.values()),
                        layer_bits=net.layer_bits),
            kd, mp.Stage.of("train", **adam(*net.codebook_finetune)),
            mp.Stage.of("encode.huffman"),
            mp.Stage.of("encode.ans"),
        ]  # fmt: skip
        return mp.Recipe(stages=tuple(stages), name=f"deep-compression-{key}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    p = base_parser(__doc__, "mnist/", "<result name>/<net>/...")
    p.add_argument("--val", action="store_true", help="tuning run on a validation split carved "
                   "from the training set (test set untouched); writes *-val files")  # fmt: skip
    p.add_argument("--nets", nargs="+", default=["lenet-300-100", "lenet5"],
                   choices=["lenet-300-100", "lenet5"], help="networks to run")  # fmt: skip
    p.add_argument("--sparsity", type=float, default=None, help="override every net's sparsity")
    p.add_argument("--linear-bits", type=int, default=None,
                   help="override every net's share.kmeans bits for Linear layers")  # fmt: skip
    p.add_argument("--prune-epochs", type=int, default=None,
                   help="override every net's epochs of the prune + fine-tune stage")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="networks in parallel processes (1 thread each)")  # fmt: skip
    return p.parse_args(argv)


def overridden(net: Net, args: argparse.Namespace) -> Net:
    """``net`` with the command line's tuning overrides applied."""
    if args.sparsity is not None:
        net = replace(net, sparsity=args.sparsity)
    if args.linear_bits is not None:
        net = replace(net, layer_bits=net.layer_bits | {"Linear": args.linear_bits})
    if args.prune_epochs is not None:
        net = replace(net, prune_finetune=(args.prune_epochs, net.prune_finetune[1]))
    return net


def load_bundle(args: argparse.Namespace, settings: Settings) -> mp.DataBundle:
    """MNIST (see ``_common.mnist_bundle``) with this benchmark's training subset."""
    root = data_dir(args.data, require="mnist")
    return mnist_bundle(root, val=args.val, train_samples=settings.train_samples, seed=args.seed)


def train_baseline(key: str, args: argparse.Namespace, settings: Settings,
                   bundle: mp.DataBundle, work: Path) -> tuple[dict[str, Any], torch.nn.Module]:  # fmt: skip
    """Train and save the dense network; its measurements and the model."""
    net = settings.nets[key]
    torch.manual_seed(args.seed)
    model = mp.load_model(net.spec, input_shape=bundle.input_shape,
                          num_classes=bundle.num_classes)  # fmt: skip
    summary = train_model(model, bundle, seed=args.seed, **adam(*net.baseline))
    model.eval()
    _acc, err, wrong = error_pct(model, bundle)
    log(f"{key} baseline: {summary['seconds']:.0f} s, error {err:.2f} %")
    path = mp.save(model, work / "baseline")
    return {"artifact": str(path), "test_error_pct": err, "test_errors": wrong,
            "n": len(bundle.test), "params": count_params(model),
            "nonzeros": count_nonzeros(model), "state_dict_bytes": state_dict_bytes(model),
            "train_seconds": summary["seconds"]}, model  # fmt: skip


def stage_ladder(result: mp.Result, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Error and artifact bytes after each stage (the paper's per-stage table)."""
    rows = []
    for s in result.stages:
        rows.append({"technique": s.technique, "seconds": s.seconds,
                     "error_pct": 100 * (1 - s.metrics["eval"]["accuracy"]),
                     "bytes": s.metrics["bytes"],
                     "ratio": base["state_dict_bytes"] / s.metrics["bytes"]})  # fmt: skip
    return rows


def median_load_ms(path: Path, runs: int) -> float:
    """Median wall time of ``modelpress.load(path)`` in ms (rebuild, decode, load)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        mp.load(path)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def save_codings(model: torch.nn.Module, work: Path, bundle: mp.DataBundle,
                 base: dict[str, Any], runs: int) -> dict[str, Any]:  # fmt: skip
    """Save the final model bit-packed, Huffman- and ANS-coded; reload and measure each."""
    out: dict[str, Any] = {}
    for coding in CODINGS:
        copy_ = copy.deepcopy(model)
        set_entropy_coding(copy_, None if coding == "bitpack" else EntropyCoding(coding, "all"))
        path = mp.save(copy_, work / coding)
        loaded = mp.load(path)
        _acc, err, wrong = error_pct(loaded, bundle)
        size = directory_bytes(path)
        out[coding] = {"artifact": str(path), "bytes": size, "test_error_pct": err,
                       "test_errors": wrong, "ratio": base["state_dict_bytes"] / size,
                       "load_ms": median_load_ms(path, runs),
                       "error_increase_pp": 100.0 * (wrong - base["test_errors"]) / base["n"]}  # fmt: skip
        if coding != "bitpack":
            out[coding]["tensors"] = entropy_rows(path)
    return out


def run_net(key: str, args: argparse.Namespace, settings: Settings, work: Path) -> dict[str, Any]:
    """Baseline, the Deep Compression recipe and its three codings for one network."""
    torch.set_num_threads(TRAIN_THREADS)
    work = work / key
    bundle = load_bundle(args, settings)
    base, model = train_baseline(key, args, settings, bundle, work)
    recipe = settings.recipe(key)
    start = time.perf_counter()
    result = mp.compress(model, recipe, data=bundle, seed=args.seed, latency_runs=0)
    seconds = time.perf_counter() - start
    codings = save_codings(result.model, work, bundle, base, settings.load_runs)
    ans = codings["ans"]
    log(f"{key}: {seconds:.0f} s, error {ans['test_error_pct']:.2f} % "
        f"({ans['error_increase_pp']:+.2f} pp), {ans['ratio']:.1f}x smaller (ANS)")  # fmt: skip
    return {"net": asdict(settings.nets[key]), "recipe": recipe.to_dict(), "baseline": base,
            "compress_seconds": seconds, "stages": stage_ladder(result, base),
            "nonzeros": count_nonzeros(result.model), "codings": codings,
            "meets_target": bool(ans["ratio"] >= TARGET_RATIO
                                 and ans["error_increase_pp"] <= TARGET_ERROR_PP + 1e-9)}  # fmt: skip


def run(args: argparse.Namespace, settings: Settings, name: str) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    work = args.work / name
    nets = in_processes(run_net, args.nets, args, settings, work, jobs=args.jobs)
    return {"benchmark": NAME, "mode": "quick" if args.quick else "full",
            "evaluation_split": "validation (held-out training images)" if args.val else "test",
            "target": {"ratio": TARGET_RATIO, "error_pp": TARGET_ERROR_PP,
                       "ans_over_entropy": ANS_SLACK, "huffman_over_entropy_bits": HUFFMAN_SLACK_BITS},
            "settings": {k: v for k, v in asdict(settings).items() if k != "nets"},
            "nets": nets, "seconds": time.perf_counter() - t0}  # fmt: skip


def _coding_rows(key: str, v: dict[str, Any]) -> list[list[str]]:
    base = v["baseline"]
    rows = [[key, "dense fp32 (`torch.save` state dict)", f"{base['test_error_pct']:.2f}", "—",
             f"{base['state_dict_bytes']:,}", "1.0×", "—"]]  # fmt: skip
    for coding in CODINGS:
        c = v["codings"][coding]
        rows.append([key, f"final, {coding}", f"{c['test_error_pct']:.2f}",
                     f"{c['error_increase_pp']:+.2f}", f"{c['bytes']:,}", f"{c['ratio']:.1f}×",
                     f"{c['load_ms']:.1f}"])  # fmt: skip
    return rows


def _stage_rows(key: str, v: dict[str, Any]) -> list[list[str]]:
    return [[key, str(i), s["technique"], f"{s['error_pct']:.2f}", f"{s['bytes']:,}",
             f"{s['ratio']:.1f}×", f"{s['seconds']:.0f}"]
            for i, s in enumerate(v["stages"], 1)]  # fmt: skip


def _entropy_rows(key: str, v: dict[str, Any]) -> tuple[list[list[str]], bool, bool]:
    """Per coded stream of the Huffman and the ANS artifact (each chose its own layouts):
    symbols, entropy, coded bits per symbol; whether every coded stream meets its bound
    (ANS: ``n`` symbols in at most ``1.02 n H + 64`` bits, the 64 being the coder's final state,
    as in the unit tests; Huffman: within H + 1 bit per symbol)."""
    rows, ok = [], {"ans": True, "huffman": True}
    for coding in ("huffman", "ans"):
        for r in v["codings"][coding]["tensors"]:
            ent, coded = r["entropy_bits"], r["stream_bits_per_symbol"]
            if r["coder"] == "ans":
                n = r["symbols"]
                ok["ans"] &= coded * n <= ent * n * (1 + ANS_SLACK) + ANS_END_BITS + 1e-6
            if r["coder"] == "huffman":
                ok["huffman"] &= coded <= ent + HUFFMAN_SLACK_BITS + 1e-9
            coded_cell = f"{coded:.3f}" if r["coder"] == coding else "(bit-packed)"
            rows.append([key, coding, r["tensor"], r["stream"], f"{r['symbols']:,}",
                         str(r["alphabet"]), f"{ent:.3f}", coded_cell,
                         f"{r['bits_per_symbol']:.3f}"])  # fmt: skip
    return rows, ok["ans"], ok["huffman"]


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report."""
    split = "test" if data["evaluation_split"] == "test" else "val"
    title = "# Deep Compression on MNIST: prune → share → entropy-code"
    title += " (quick smoke run)" if data["mode"] == "quick" else ""
    title += " — validation run (for tuning)" if split == "val" else ""
    verdicts, coding_rows, stage_rows, ent_rows = [], [], [], []
    for key, v in data["nets"].items():
        ans = v["codings"]["ans"]
        rows, ans_ok, huff_ok = _entropy_rows(key, v)
        ent_rows += rows
        verdicts.append(
            f"- **{key}: {'met' if v['meets_target'] else 'missed'}** — {ans['ratio']:.1f}× "
            f"smaller (paper {PAPER.get(key, 0):.0f}×) at {ans['error_increase_pp']:+.2f} pp; "
            f"ANS within {ANS_SLACK:.0%} of H (+ its {ANS_END_BITS}-bit end state) on every stream: "
            f"{'yes' if ans_ok else 'no'}; Huffman within H + 1 bit: {'yes' if huff_ok else 'no'}"
        )
        coding_rows += _coding_rows(key, v)
        stage_rows += _stage_rows(key, v)
    parts = [
        title,
        f"Target: **≥ {TARGET_RATIO:.0f}× smaller at ≤ {TARGET_ERROR_PP} pp more {split} error, "
        "both networks**; ANS within 2 % of the empirical entropy, Huffman within H + 1 bit.",
        "\n".join(verdicts),
        "## Final model, three codings of the same weights",
        markdown_table(
            ["net", "artifact", f"{split} error %", "Δ pp", "bytes", "smaller", "load ms"],
            coding_rows,
            align="llrrrrr",
        ),
        "## After each stage (the paper's table)",
        markdown_table(
            ["net", "#", "stage", f"{split} error %", "artifact bytes", "smaller", "seconds"],
            stage_rows,
            align="lrlrrrr",
        ),
        "## Entropy coding per stream",
        markdown_table(
            [
                "net",
                "artifact",
                "tensor",
                "stream",
                "symbols",
                "alphabet",
                "entropy bits",
                "coded bits",
                "with table",
            ],
            ent_rows,
            align="llllrrrrr",
        ),
        "## What the columns are",
        "Errors on the 10,000 MNIST test images (0.01 pp per image; one seed), measured on the "
        "model reloaded from each artifact. Bytes: the whole artifact directory against the "
        "baseline's fp32 `torch.save(state_dict)` file. *Load ms*: median wall time of "
        "`modelpress.load` (rebuild the network, decode every payload, load). Per stream: "
        "*entropy* is the empirical (order-0) entropy of its symbols in bits per symbol, *coded "
        "bits* the coded stream's bits per symbol, *with table* adds the stored coding table. "
        "Each artifact chooses its own layout per tensor by true coded size (ANS can code a "
        "mostly-zero tensor densely below one bit per weight; Huffman cannot), so the two "
        "artifacts' streams differ. Streams where table + stream would not beat bit-packing "
        "stay bit-packed.",
        "## Run",
        run_info_markdown(info),
    ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``<out>/deep_compression_mnist[-val][-quick].{json,md}``."""
    args = parse_args(argv)
    settings = Settings().quick() if args.quick else Settings()
    settings = replace(settings, nets={k: overridden(n, args) for k, n in settings.nets.items()})
    name = result_name(NAME, args)
    info = run_info(__file__, argv,
                    threads={"train": TRAIN_THREADS, "processes": args.jobs})  # fmt: skip
    data = run(args, settings, name)
    return finish(name, args, info, data, markdown, "\n\n## Entropy coding")


if __name__ == "__main__":
    main_guard(main)
