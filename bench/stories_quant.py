"""Weight-only quantization of stories260K: RTN vs GPTQ vs AWQ vs HQQ at 4 and 3 bits.

Run from the repository root::

    python bench/stories_quant.py           # the real benchmark (a few minutes on 1 thread)
    python bench/stories_quant.py --quick   # smoke run: fewer, shorter stories; "-quick" files

The model is Karpathy's llama2.c ``stories260K`` (a 260K-parameter Llama 2 trained on
TinyStories) from ``<data>/stories260K/stories260K.gguf``, loaded with the ``gguf:`` spec.
No TinyStories text is available offline, so the data are stories *sampled from the fp32
model itself*: temperature 1 (plain softmax, no top-k/top-p), from BOS, a fixed number of
tokens each, batched with a KV cache and a seeded ``torch.Generator``. Calibration and
evaluation stories come from different seeds (``1000 + seed`` and ``2000 + seed``), so no
compressed model is evaluated on text it was calibrated on. Sampling runs on to the fixed
length even past an end of story (the model then starts a new one after BOS, as in training).

Every arm is one ``modelpress.compress`` stage on the Linear layers of the five decoder blocks
(q, k, v, o, gate, up, down: 226,560 weights), asymmetric, one fp16 scale and zero point per
group of 32 inputs (the model's widths are 64 and 172, so 128 would be a whole row; 172 ends in
a short group of 12). The token embedding, which is also the output head (tied), and the
RMSNorm weights stay fp32. Arms: ``fp32``; ``quant.rtn``, ``quant.gptq``, ``quant.awq`` and
``quant.hqq`` at 4 and 3 bits, each with its defaults otherwise, and GPTQ with ``act_order``
(``gptq-ao``), plus ``clip`` (``-clip``: each group's range from the output-error search),
``sequential`` (``-seq``: each layer's Hessian after the layers before it are quantized) and
``asymmetric`` (``-asym``: each layer matched to the fp32 model's output on the fp32 model's
inputs, GPTAQ). An arm whose technique is not registered is skipped with a note.

Reported per arm, on the model *reloaded from its artifact*: mean KL(fp32 || quantized) of the
next-token distributions over every evaluation position, top-1 agreement with fp32, the
perplexity of the evaluation stories, artifact bytes (the directory ``result.save`` writes)
and the time of the quantization stage. Target (issue 4): **GPTQ's KL at most half of RTN's**.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.measure import count_params, directory_bytes
from modelpress.models.gguf_tokenizer import gguf_tokenizer
from modelpress.registry import technique_names

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BenchError,
    base_parser,
    data_dir,
    log,
    main_guard,
    markdown_table,
    run_info,
    run_info_markdown,
    write_results,
)

NAME = "stories_quant"
MODEL_FILE = Path("stories260K") / "stories260K.gguf"
GROUP_SIZE = 32
CALIB_SEED, EVAL_SEED = 1000, 2000  # + --seed: the two sample streams never coincide
BOS = 1


@dataclass(frozen=True)
class Arm:
    """One variant: a single weight-quantization stage (None for the fp32 model)."""

    key: str
    method: str  # fp32 | rtn | gptq | awq | hqq
    bits: int  # 32 for fp32
    stage: dict[str, Any] | None


SUFFIXES = (("act_order", "ao"), ("sequential", "seq"), ("asymmetric", "asym"), ("clip", "clip"))


def _arm(method: str, bits: int, **extra: Any) -> Arm:
    stage = {"technique": f"quant.{method}", "bits": bits, "group_size": GROUP_SIZE, **extra}
    flags = "".join(f"-{short}" for option, short in SUFFIXES if extra.get(option))
    return Arm(f"{method}{flags}-{bits}", method, bits, stage)


ARMS = (
    Arm("fp32", "fp32", 32, None),
    *(
        arm
        for bits in (4, 3)
        for arm in (
            _arm("rtn", bits),
            _arm("gptq", bits),
            _arm("gptq", bits, act_order=True),
            _arm("gptq", bits, act_order=True, clip=True),
            _arm("gptq", bits, act_order=True, sequential=True, clip=True),
            _arm("gptq", bits, act_order=True, sequential=True, asymmetric=True),
            _arm("gptq", bits, act_order=True, sequential=True, asymmetric=True, clip=True),
            _arm("awq", bits),
            _arm("hqq", bits),
        )
    ),
)
TARGETING = {"targets": ["Linear"], "ignore": ["lm_head"]}  # the head is the tied embedding


@dataclass(frozen=True)
class Settings:
    """Every knob of the benchmark."""

    calib_stories: int = 128
    eval_stories: int = 256
    story_tokens: int = 256  # sampled after BOS (the model was trained on 512)
    batch: int = 32  # stories per forward pass (sampling, calibration and evaluation)

    def quick(self) -> Settings:
        """The smoke-run version."""
        return replace(self, calib_stories=16, eval_stories=16, story_tokens=64, batch=16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    p = base_parser(__doc__, str(MODEL_FILE), "<result name>/<arm>",
                    "the sampled calibration and evaluation stories")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


# --------------------------------------------------------------------------- data


@torch.inference_mode()
def sample_stories(model: nn.Module, n: int, tokens: int, seed: int, batch: int) -> torch.Tensor:
    """``n`` stories of ``tokens`` tokens sampled at temperature 1 after BOS.

    Returns:
        ``(n, tokens + 1)`` int64 ids, BOS first.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        ids = torch.full((min(batch, n - start), 1), BOS, dtype=torch.long)
        step, cache = ids, None
        for _ in range(tokens):
            res = model(input_ids=step, past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            probs = torch.softmax(res.logits[:, -1].double(), dim=-1)  # (B, V)
            step = torch.multinomial(probs, 1, generator=gen)  # (B, 1)
            ids = torch.cat([ids, step], dim=1)
        out.append(ids)
    return torch.cat(out)


def sha256_ids(ids: torch.Tensor) -> str:
    """Fingerprint of a token tensor (same seed and threads, same stories)."""
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- metrics


@torch.inference_mode()
def compare(model: nn.Module, reference: nn.Module, stories: torch.Tensor, batch: int
            ) -> dict[str, float]:  # fmt: skip
    """KL(reference || model), top-1 agreement and perplexity over every story position.

    Position ``t`` (input tokens ``0..t``) predicts token ``t + 1``; the last input position
    has no target and is left out, so each story of ``T + 1`` ids gives ``T`` positions.
    """
    kl = agree = nll = ref_nll = 0.0
    positions = 0
    for chunk in stories.split(batch):
        logp = F.log_softmax(model(input_ids=chunk).logits[:, :-1].double(), -1)  # (B, T, V)
        ref = F.log_softmax(reference(input_ids=chunk).logits[:, :-1].double(), -1)
        target = chunk[:, 1:, None]  # (B, T, 1)
        kl += float((ref.exp() * (ref - logp)).sum())
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        nll -= float(logp.gather(-1, target).sum())
        ref_nll -= float(ref.gather(-1, target).sum())
        positions += target.numel()
    return {"kl": kl / positions, "top1_agreement": agree / positions,
            "nll": nll / positions, "perplexity": float(torch.tensor(nll / positions).exp()),
            "fp32_perplexity": float(torch.tensor(ref_nll / positions).exp()),
            "positions": positions}  # fmt: skip


def quantized_weights(model: nn.Module) -> int:
    """Weights of the decoder blocks' Linear layers (what every arm quantizes)."""
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != "lm_head")  # fmt: skip


# --------------------------------------------------------------------------- arms


def missing_technique(arm: Arm) -> str | None:
    """Why the arm cannot run now (its technique is not registered), else None."""
    if arm.stage is None or arm.stage["technique"] in technique_names():
        return None
    return f"{arm.stage['technique']} is not registered in modelpress"


def run_arm(arm: Arm, dense: nn.Module, calib: list[dict[str, torch.Tensor]],
            stories: torch.Tensor, args: argparse.Namespace, batch: int) -> dict[str, Any]:  # fmt: skip
    """Quantize (or save, for fp32), save, reload and measure one arm."""
    path = args.work / args.name / arm.key
    rec: dict[str, Any] = {"method": arm.method, "bits": arm.bits, "stage": arm.stage}
    if arm.stage is None:
        path, in_memory, seconds = mp.save(dense, path), dense, 0.0
    else:
        start = time.perf_counter()
        result = mp.compress(dense, [{**arm.stage, **TARGETING}], data=calib, seed=args.seed,
                             example_inputs=calib[0], latency_runs=0)  # fmt: skip
        rec["compress_seconds"] = time.perf_counter() - start
        seconds, in_memory = result.stages[0].seconds, result.model
        path = result.save(path)
    loaded = mp.load(path).eval()
    with torch.inference_mode():
        probe = stories[:2]
        diff = loaded(input_ids=probe).logits - in_memory.eval()(input_ids=probe).logits
    rec |= compare(loaded, dense, stories, batch)
    rec |= {"artifact": str(path), "bytes": directory_bytes(path), "quantize_seconds": seconds,
            "reload_max_abs_logit_diff": float(diff.abs().max())}  # fmt: skip
    log(f"{arm.key}: KL {rec['kl']:.5f}, top-1 {100 * rec['top1_agreement']:.2f} %, ppl "
        f"{rec['perplexity']:.4f}, {rec['bytes']:,} bytes, {seconds:.1f} s")  # fmt: skip
    return rec


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results."""
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    file = data_dir(args.data, require=str(MODEL_FILE.parent)) / MODEL_FILE
    if not file.is_file():
        raise BenchError(f"{file} does not exist; the data directory must hold {MODEL_FILE}.")
    dense = mp.load_model(f"gguf:{file}").eval()
    s = settings
    log(f"sampling {s.calib_stories} calibration + {s.eval_stories} evaluation stories ...")
    calib_ids = sample_stories(dense, s.calib_stories, s.story_tokens, CALIB_SEED + args.seed,
                               s.batch)  # fmt: skip
    eval_ids = sample_stories(dense, s.eval_stories, s.story_tokens, EVAL_SEED + args.seed,
                              s.batch)  # fmt: skip
    calib = [{"input_ids": c} for c in calib_ids.split(s.batch)]
    arms: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for arm in ARMS:
        why = missing_technique(arm)
        if why:
            log(f"{arm.key}: skipped ({why})")
            skipped[arm.key] = why
            continue
        arms[arm.key] = run_arm(arm, dense, calib, eval_ids, args, s.batch)
    for rec in arms.values():
        rec["bytes_ratio"] = arms["fp32"]["bytes"] / rec["bytes"]
    tokenizer = gguf_tokenizer(dense)
    return {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "model": f"stories260K ({file.name}, {file.stat().st_size:,} bytes)",
        "params": count_params(dense),
        "quantized_weights": quantized_weights(dense),
        "group_size": GROUP_SIZE,
        "settings": asdict(settings),
        "data": {
            "calibration_seed": CALIB_SEED + args.seed,
            "evaluation_seed": EVAL_SEED + args.seed,
            "calibration_sha256": sha256_ids(calib_ids),
            "evaluation_sha256": sha256_ids(eval_ids),
            "bos_in_evaluation": int((eval_ids[:, 1:] == BOS).sum()),
            "evaluation_story_0": tokenizer.decode(eval_ids[0], skip_special_tokens=True),
        },
        "arms": arms,
        "skipped": skipped,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- report


def results_table(data: dict[str, Any]) -> str:
    """One row per arm."""
    rows = []
    for key, r in data["arms"].items():
        fp32 = key == "fp32"
        rows.append([
            f"`{key}`", "—" if fp32 else r["bits"], "0" if fp32 else f"{r['kl']:.5f}",
            f"{100 * r['top1_agreement']:.2f}", f"{r['perplexity']:.4f}", f"{r['bytes']:,}",
            f"{r['bytes_ratio']:.2f}×", "—" if fp32 else f"{r['quantize_seconds']:.2f}",
        ])  # fmt: skip
    headers = ["arm", "bits", "mean KL(fp32 ‖ q) nats", "top-1 agreement %", "perplexity",
               "artifact bytes", "smaller", "quantize s"]  # fmt: skip
    return markdown_table(headers, rows, align="lrrrrrrr")


def reading(data: dict[str, Any]) -> str:
    """A short, number-backed reading of the table, with the target verdict."""
    arms, lines = data["arms"], []
    for bits in (4, 3):
        rtn = arms.get(f"rtn-{bits}")
        gptq = {k: r for k, r in arms.items() if k.startswith("gptq") and k.endswith(f"-{bits}")}
        if rtn is None or not gptq:
            continue
        ratios = {k: r["kl"] / rtn["kl"] for k, r in gptq.items()}
        best = min(ratios, key=ratios.__getitem__)
        verdict = f"**met** by `{best}`" if ratios[best] <= 0.5 else "**missed**"
        cells = ", ".join(f"`{k}` {v:.2f}×" for k, v in ratios.items())
        ranked = sorted((k for k in arms if k.endswith(f"-{bits}")), key=lambda k: arms[k]["kl"])
        lines.append(f"- {bits} bits: GPTQ's KL over RTN's: {cells} (target ≤ 0.5×: {verdict}). "
                     f"By KL: {' < '.join(f'`{k}`' for k in ranked)}.")  # fmt: skip
    for key, why in data["skipped"].items():
        lines.append(f"- `{key}` skipped: {why}.")
    diff = max(r["reload_max_abs_logit_diff"] for r in arms.values())
    lines.append(f"- Every number is measured on the model reloaded from its artifact; its "
                 f"logits differ from the in-memory model's by at most {diff:.1e}.")  # fmt: skip
    return "\n".join(lines)


def to_markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    """The Markdown report."""
    s, d = data["settings"], data["data"]
    return "\n".join([
        f"# stories260K weight-only quantization{' (quick)' if data['mode'] == 'quick' else ''}",
        "",
        f"{data['model']}: {data['params']:,} parameters; {data['quantized_weights']:,} weights "
        f"quantized (the Linear layers of the 5 decoder blocks), asymmetric, group size "
        f"{data['group_size']}, fp16 scales and zero points; embedding (= tied head) and norms "
        "fp32. Bytes are the artifact directory; `smaller` is against the fp32 artifact.",
        "",
        f"Data: {s['calib_stories']} calibration stories (seed {d['calibration_seed']}) and "
        f"{s['eval_stories']} evaluation stories (seed {d['evaluation_seed']}), each "
        f"{s['story_tokens']} tokens sampled from the fp32 model at temperature 1 after BOS; "
        f"metrics over all {data['arms']['fp32']['positions']:,} evaluation positions.",
        "",
        results_table(data),
        "",
        reading(data),
        "",
        f"First evaluation story: “{d['evaluation_story_0'][:300].strip()}…”",
        "",
        "## Run",
        "",
        run_info_markdown(info),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``bench/results/stories_quant[-quick].{json,md}``."""
    args = parse_args(argv)
    settings = Settings().quick() if args.quick else Settings()
    args.name = NAME + ("-quick" if args.quick else "")
    info = run_info(__file__, argv, threads={"all": args.threads}) | {"seed": args.seed}
    data = run(args, settings)
    info["seconds"] = data["seconds"]
    json_path, md_path = write_results(args.name, {**info, **data}, to_markdown(data, info),
                                       args.out)  # fmt: skip
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    main_guard(main)
