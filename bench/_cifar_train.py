"""CIFAR-10 training for the benchmarks: JPEG decoding, augmentation, splits, the baseline.

Benchmark-only (neither the package nor the tests import it). Shared by every ResNet-20
benchmark so each compares against the same baseline: Distiller's checkpoint fine-tuned
briefly on the JPEG training split (``run_baseline``), evaluated on the JPEG test split (or,
with ``--val``, on 5,000 images held out of the training split). Training batches are
augmented the standard CIFAR way (random 32x32 crop of the 4-pixel zero-padded image,
horizontal flip), seeded per pass so every arm sees the same data order and crops.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _cifar import (
    CHECKPOINT,
    TRAIN_JPEG,
    _require,
    load_cifar10_test_jpeg,
    load_resnet20_checkpoint,
)
from _common import VAL_SIZE, VAL_SPLIT_SEED, BenchError, log
from torch import nn

import modelpress as mp
from modelpress.errors import ArtifactError
from modelpress.measure import accuracy, directory_bytes
from modelpress.train import train_model

RECORD = "record.json"  # a cached baseline's record, written last (marks the entry complete)
PAD = 4  # pixels of zero padding around each image before the random 32x32 crop


@dataclass(frozen=True)
class TrainingSettings:
    """The data and training hyperparameters every CIFAR benchmark shares."""

    train_samples: int | None = None  # None: the whole training split
    eval_samples: int | None = None  # None: the whole evaluation split
    batch_size: int = 128
    baseline_epochs: int = 2
    baseline_lr: float = 0.01
    finetune_epochs: int = 4
    finetune_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def quick_data(self) -> Any:
        """The smoke-run data: 1,024 training and 500 evaluation images, 1 + 1 epochs."""
        return replace(self, train_samples=1024, eval_samples=500, baseline_epochs=1,
                       finetune_epochs=1)  # fmt: skip

    def train_config(self, which: str) -> dict[str, Any]:
        """``train`` stage fields of the ``"baseline"`` or ``"finetune"`` training (SGD, cosine)."""
        epochs, lr = ((self.baseline_epochs, self.baseline_lr) if which == "baseline"
                      else (self.finetune_epochs, self.finetune_lr))  # fmt: skip
        return dict(epochs=epochs, lr=lr, optimizer="sgd", momentum=self.momentum,
                    weight_decay=self.weight_decay, schedule="cosine",
                    batch_size=self.batch_size)  # fmt: skip


def read_train_jpeg(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(jpeg bytes, offsets, labels)`` of the 50,000 JPEG training images, read once."""
    with np.load(_require(root / TRAIN_JPEG)) as data:  # every data[key] re-reads the zip
        return data["jpeg"], data["offsets"], data["labels"]


def decode_jpegs(buffer: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Decode images ``rows`` with Pillow into uint8 ``(n, 3, 32, 32)`` (kept in memory)."""
    from PIL import Image  # installed with matplotlib

    images = np.empty((len(rows), 32, 32, 3), dtype=np.uint8)  # (n, H, W, C)
    for out, i in enumerate(rows):
        with Image.open(io.BytesIO(buffer[offsets[i] : offsets[i + 1]].tobytes())) as image:
            images[out] = np.asarray(image.convert("RGB"))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (n, 3, 32, 32)


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, 3, 32, 32)`` -> float in ``[-1, 1]``, as ``_cifar`` (Distiller's transform)."""
    return images.float().div(255).sub(0.5).div(0.5)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of each image zero-padded by ``PAD``, flipped left-right with p=0.5.

    The standard CIFAR augmentation (He et al. 2016), on a uint8 batch ``(B, C, H, W)``, in
    one gather: per-image row/column offsets in ``[0, 2 PAD]``, and a flip is the column index
    reversed. Padding is black (0) before normalization, as ``RandomCrop(padding=4)`` does.

    Returns:
        Float inputs ``(B, C, H, W)`` in ``[-1, 1]``.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))  # (B, C, H + 2 PAD, W + 2 PAD)
    dy = torch.randint(0, 2 * PAD + 1, (b, 1), generator=generator)  # (B, 1)
    dx = torch.randint(0, 2 * PAD + 1, (b, 1), generator=generator)  # (B, 1)
    flip = torch.rand(b, 1, generator=generator) < 0.5  # (B, 1)
    rows = dy + torch.arange(h)  # (B, H)
    cols = dx + torch.arange(w)  # (B, W)
    cols = torch.where(flip, cols.flip(1), cols)  # (B, W)
    crops = padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # (B, C, H, W)
    return to_inputs(crops)


class AugmentedBatches:
    """Re-iterable ``(inputs, labels)`` training batches; every pass is one augmented epoch.

    Pass ``k`` (counted from 0 per instance) shuffles and augments with a generator seeded by
    ``(seed, k)``, so two instances with the same seed yield identical epochs: every arm gets
    the same data order and the same crops and flips.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 seed: int) -> None:  # fmt: skip
        self.images, self.labels = images, labels  # (N, 3, 32, 32) uint8, (N,)
        self.batch_size, self.seed, self.passes = batch_size, seed, 0
        self.step_seconds: list[float] = []  # between consecutive batches of a pass

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
        self.passes += 1
        order = torch.randperm(len(self.labels), generator=generator)
        resumed = None
        for batch in order.split(self.batch_size):
            yield augment(self.images[batch], generator), self.labels[batch]
            now = time.perf_counter()  # the consumer has trained on the batch
            if resumed is not None:  # one augmentation + one training step
                self.step_seconds.append(now - resumed)
            resumed = now

    def seconds_per_image(self) -> float | None:
        """Median seconds per training image over the steps seen (warm-up-robust)."""
        if not self.step_seconds:
            return None
        return float(np.median(self.step_seconds)) / self.batch_size


@dataclass
class Splits:
    """Training images (uint8, augmented per batch) and the evaluation split (float)."""

    train_images: torch.Tensor  # (N, 3, 32, 32) uint8
    train_labels: torch.Tensor  # (N,) int64
    eval_inputs: torch.Tensor  # (M, 3, 32, 32) float in [-1, 1]
    eval_labels: torch.Tensor  # (M,) int64
    split: str  # "test" or "val"
    spec: str
    load_seconds: float  # reading both files, decoding included
    decode_seconds_per_image: float  # Pillow JPEG decoding alone

    def batches(self, settings: TrainingSettings, seed: int) -> AugmentedBatches:
        """A fresh augmented stream: same seed, same batches."""
        return AugmentedBatches(self.train_images, self.train_labels, settings.batch_size, seed)


_SPLITS: dict[tuple[Any, ...], Splits] = {}  # per process: decode once


def load_splits(root: Path, val: bool, settings: TrainingSettings, seed: int) -> Splits:
    """CIFAR-10 JPEG: training images (minus the validation hold-out with ``val``) and either
    the 10,000 test images or the 5,000 held-out training images; seeded subsets when the
    settings ask for them. Cached per process."""
    key = (str(root), val, settings.train_samples, settings.eval_samples, seed)
    if key not in _SPLITS:
        _SPLITS[key] = _load_splits(root, val, settings, seed)
    return _SPLITS[key]


def _load_splits(root: Path, val: bool, settings: TrainingSettings, seed: int) -> Splits:
    start = time.perf_counter()
    buffer, offsets, labels = read_train_jpeg(root)
    rows = torch.arange(len(labels))
    spec = f"cifar10-jpeg:{root / 'cifar10'}"
    if val:  # the same fixed split as every benchmark's --val, independent of --seed
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        held, rows = order[:VAL_SIZE], order[VAL_SIZE:]
        eval_x = to_inputs(decode_jpegs(buffer, offsets, held.numpy()))
        eval_y = torch.from_numpy(labels[held.numpy()]).long()
        spec += f" (validation: {VAL_SIZE} training images held out)"
    else:
        eval_x, eval_y = load_cifar10_test_jpeg(root)
    picker = torch.Generator().manual_seed(seed)
    if settings.train_samples is not None:
        rows = rows[torch.randperm(len(rows), generator=picker)[: settings.train_samples]]
        spec += f" (subset: {settings.train_samples} training images)"
    if settings.eval_samples is not None:
        keep = torch.randperm(len(eval_y), generator=picker)[: settings.eval_samples]
        eval_x, eval_y = eval_x[keep], eval_y[keep]
        spec += f" (subset: {settings.eval_samples} evaluation images)"
    t_decode = time.perf_counter()
    train_x = decode_jpegs(buffer, offsets, rows.numpy())
    per_image = (time.perf_counter() - t_decode) / max(len(rows), 1)
    train_y = torch.from_numpy(labels[rows.numpy()]).long()
    return Splits(train_x, train_y, eval_x.contiguous(), eval_y, "val" if val else "test", spec,
                  time.perf_counter() - start, per_image)  # fmt: skip


class Evaluator:
    """Top-1 on the evaluation split; counts the time it spends (for the run-time estimate)."""

    def __init__(self, splits: Splits) -> None:
        self.batches = list(
            zip(splits.eval_inputs.split(1000), splits.eval_labels.split(1000), strict=True)
        )
        self.n, self.seconds, self.images = len(splits.eval_labels), 0.0, 0

    def correct(self, model: nn.Module) -> int:
        """Correct predictions of ``model``."""
        start = time.perf_counter()
        acc = accuracy(model, self.batches)
        self.seconds += time.perf_counter() - start
        self.images += self.n
        return round(acc * self.n)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """The ``evaluate`` hook of ``modelpress.compress``."""
        return {"accuracy": self.correct(model) / self.n}


def train_record(cfg: dict[str, Any], seconds: float, steps: int, final_loss: float,
                 batches: AugmentedBatches) -> dict[str, Any]:  # fmt: skip
    """What a training run records: its config, time, steps, last loss and the steady-state
    seconds per image (median step time / batch size; for the run-time estimate)."""
    per_image = batches.seconds_per_image()
    if per_image is None:  # a single step: no steady state seen
        per_image = seconds / max(cfg["epochs"] * len(batches.labels), 1)
    return {**cfg, "seconds": seconds, "steps": steps, "final_loss": final_loss,
            "seconds_per_image": per_image,
            "epoch_seconds_estimate": per_image * len(batches.labels)}  # fmt: skip


def baseline_key(root: Path, settings: TrainingSettings, splits: Splits, seed: int) -> str:
    """A digest of everything the fine-tuned baseline depends on: the checkpoint and training
    file (path, size), the baseline training config, the data split and subsets, the seed,
    the torch version and thread count."""
    files = [Path(root) / CHECKPOINT, Path(root) / TRAIN_JPEG]
    inputs = {
        "files": [(str(f.resolve()), f.stat().st_size) for f in files],
        "train": settings.train_config("baseline"),
        "train_samples": settings.train_samples,
        "split": splits.spec,
        "seed": seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def run_baseline(splits: Splits, root: Path, settings: TrainingSettings, seed: int, work: Path,
                 ev: Evaluator) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """The checkpoint, evaluated, then fine-tuned briefly on the JPEG training split.

    The fine-tuned baseline is kept in ``<work>/../baselines/<baseline_key>`` and reused by a
    later run with the same inputs (every CIFAR benchmark, every ``--tag``) once re-evaluating
    it gives the recorded accuracy; delete that folder to fine-tune again. A reused record
    says so under ``reused_from``.
    """
    cache = work.parent / "baselines" / baseline_key(root, settings, splits, seed)
    reused = _reuse_baseline(cache, ev)
    if reused is not None:
        return reused
    model = load_resnet20_checkpoint(root)
    checkpoint_correct = ev.correct(model)
    cfg = settings.train_config("baseline")
    batches = splits.batches(settings, seed)
    summary = train_model(model, batches, seed=seed, **cfg)
    model.eval()
    correct = ev.correct(model)
    log(f"baseline: fine-tuned {summary['seconds']:.0f} s; {splits.split} accuracy "
        f"{100 * checkpoint_correct / ev.n:.2f} % -> {100 * correct / ev.n:.2f} %")  # fmt: skip
    path = mp.save(model, cache / "artifact")
    record = {
        "train": train_record(cfg, summary["seconds"], summary["steps"], summary["final_loss"],
                              batches),
        "checkpoint_correct": checkpoint_correct,
        "correct": correct,
        "artifact": str(path),
        "artifact_bytes": directory_bytes(path),
    }  # fmt: skip
    (cache / RECORD).write_text(json.dumps(record, indent=1))
    return model, record


def reuse_note(base: dict[str, Any]) -> str:
    """`` (reused ...)`` for a baseline record taken from the cache, else ``""``."""
    if "reused_from" not in base:
        return ""
    return (
        " (reused: fine-tuned by an earlier run with the same inputs; the same accuracy on "
        "re-evaluation)"
    )


def _reuse_baseline(cache: Path, ev: Evaluator) -> tuple[nn.Module, dict[str, Any]] | None:
    """The cached baseline and its record, or None when there is none or it no longer
    evaluates to the recorded number of correct predictions."""
    if not (cache / RECORD).is_file():
        return None
    path = cache / "artifact"  # not the recorded path: the work folder may have moved
    try:
        record = json.loads((cache / RECORD).read_text())
        model = mp.load(path).eval()
    except (ValueError, OSError, ArtifactError) as e:
        raise BenchError(f"cached baseline {cache} is unreadable ({e}); delete that folder to "
                         "fine-tune the baseline again") from e  # fmt: skip
    correct = ev.correct(model)
    if correct != record["correct"]:
        log(f"baseline: cached {cache} gives {correct} correct, not {record['correct']}; "
            "fine-tuning again")  # fmt: skip
        return None
    log(f"baseline: reused {cache} ({100 * correct / ev.n:.2f} %)")
    return model, record | {"artifact": str(path), "reused_from": str(cache)}
