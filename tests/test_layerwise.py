"""modelpress.layerwise: im2col columns, finding blocks, block-by-block calibration on plain
and Hugging Face models (kwargs, attention masks, caches), and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.context import Context
from modelpress.errors import DataError, UnsupportedModuleError
from modelpress.layerwise import (
    Hessian,
    asymmetric_target,
    calibrate_layerwise,
    conv_columns,
    find_blocks,
)
from modelpress.recipe import Stage
from modelpress.registry import get_technique
from modelpress.techniques.pruning.mask import set_mask
from modelpress.techniques.pruning.unstructured import keep_mask

transformers = pytest.importorskip("transformers")


class Rows:
    """Statistics that keep every input row."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def update(self, columns: torch.Tensor) -> None:
        self.rows.append(columns)


class Recording:
    """A callback that records the order and inputs of layers and prunes each to 50%."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.inputs: dict[str, torch.Tensor] = {}

    def stats(self, name: str, module: nn.Module) -> Rows:
        return Rows()

    def process(self, name: str, module: nn.Module, stats: Rows) -> None:
        self.order.append(name)
        self.inputs[name] = torch.cat(stats.rows)
        set_mask(module, "weight", keep_mask(module.weight.abs(), 0.5))


def linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def apply(name, model, batches, **params):
    stage = Stage.of(name, **params)
    ctx = Context(batches=batches)
    return get_technique(name).apply(model, stage.config, ctx), ctx


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
        (nn.Conv2d(3, 4, (3, 2), padding="same", dilation=(2, 1)), (2, 3, 7, 6)),
        (nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), (2, 3, 7, 6)),
        (nn.Conv3d(2, 4, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 3)),
    ],
)
def test_conv_columns_reproduce_the_convolution(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    with torch.no_grad():
        y = conv(x)  # (B, out, *spatial)
    rows = conv_columns(conv, x) @ conv.weight.detach().flatten(1).T + conv.bias.detach()
    rows = rows.reshape(y.shape[0], *y.shape[2:], -1).movedim(-1, 1)
    torch.testing.assert_close(rows, y)


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (6, 10))
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[:3, 6:] = 0  # three padded sentences
    return model, {"input_ids": ids, "attention_mask": mask}


def test_bert_blocks_run_in_order_on_the_pruned_blocks_outputs():
    model, batch = tiny_bert()
    with torch.no_grad():
        before = model(**batch, output_hidden_states=True).hidden_states
    name, blocks = find_blocks(model, linears(model))
    assert name == "encoder.layer" and len(blocks) == 2
    rec = Recording()
    calibrate_layerwise(model, [batch], linears(model), rec, owner="test")
    per_block = [n for n, _ in linears(model.encoder.layer[0])]
    assert rec.order[:6] == [f"encoder.layer.0.{n}" for n in per_block]
    assert rec.order[-1] == "pooler.dense"  # after the blocks, from a whole-model pass
    with torch.no_grad():
        after = model(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    seen = rec.inputs["encoder.layer.1.attention.self.query"]  # block 2's input, real tokens
    assert seen.shape == (int(real.sum()), 32)  # padding tokens left out
    torch.testing.assert_close(seen, after[1][real])  # from the pruned block 1
    assert not torch.allclose(seen, before[1][real], atol=1e-3)
    torch.testing.assert_close(rec.inputs["encoder.layer.0.attention.self.query"], before[0][real])


@pytest.mark.parametrize("name", ["prune.sparsegpt", "prune.wanda"])
def test_bert_every_linear_is_pruned_to_the_target(name):
    model, batch = tiny_bert()
    model, ctx = apply(name, model, [batch, batch], sparsity=0.5)
    for layer_name, layer in linears(model):
        zeros = (layer.weight == 0).reshape(layer.weight.shape[0], -1).float().mean(1)
        assert torch.all(zeros == 0.5), layer_name  # every row of every layer
    assert set(ctx.reports["sparsity"]) == {n for n, _ in linears(model)}


def test_llama_blocks_take_keyword_inputs_and_no_cache_grows():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    batch = {"input_ids": torch.randint(0, 100, (4, 8))}
    with torch.no_grad():
        ref = model(**batch).logits
    assert find_blocks(model, linears(model))[0] == "model.layers"
    model, ctx = apply("prune.sparsegpt", model, [batch, batch], n=2, m=4)
    assert set(ctx.reports["sparsity"].values()) == {0.5}
    assert "lm_head" in ctx.reports["sparsity"]
    with torch.no_grad():
        out = model(**batch).logits
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).mean()
    assert cosine > 0.8


class Stem(nn.Module):
    """A Linear before a ModuleList of blocks, and a head after them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_layers_before_the_blocks_are_processed_first():
    torch.manual_seed(0)
    model, x = Stem().train(), torch.randn(16, 8)
    model.head.eval()
    rec = Recording()
    calibrate_layerwise(model, [x[:8], x[8:]], linears(model), rec, owner="test")
    assert rec.order == ["stem", "blocks.0.0", "blocks.1.0", "blocks.2.0", "head"]
    assert model.blocks[2].training and not model.head.training  # modes restored
    with torch.no_grad():
        torch.testing.assert_close(rec.inputs["blocks.0.0"], model.stem(x))  # pruned stem


class Heads(nn.Module):
    """A ModuleList of parallel heads on one input: not a sequence of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 3) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


def test_parallel_module_lists_and_plain_models_are_one_block():
    torch.manual_seed(0)
    model, x = Heads(), torch.randn(16, 8)
    rec = Recording()
    calibrate_layerwise(model, [x], linears(model), rec, owner="test")
    assert rec.order == ["body", "heads.0", "heads.1"]
    torch.testing.assert_close(rec.inputs["heads.1"], rec.inputs["heads.0"])
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_blocks(mlp, linears(mlp)) is None


def test_nan_activations_are_a_data_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(4, 4)
    x[1, 2] = float("nan")
    with pytest.raises(DataError, match=r"^0: the calibration activations reaching it contain"):
        calibrate_layerwise(model, [x], linears(model), Recording(), owner="test")


def test_a_layer_the_data_never_reaches_is_an_error():
    model = Heads()
    model.spare = nn.Linear(8, 8)  # registered, never called
    with pytest.raises(UnsupportedModuleError, match=r"^spare: not called when the calibration"):
        calibrate_layerwise(model, [torch.randn(4, 8)], linears(model), Recording(), owner="t")


class TwoLayerBlocks(nn.Module):
    """Blocks of two Linears each: the second reads the first's output."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_gives_each_layer_the_inputs_of_the_processed_layers_before_it(sequential):
    torch.manual_seed(0)
    model, x = TwoLayerBlocks(), torch.randn(16, 8)
    first = model.blocks[0][0]
    dense_out = torch.relu(first(x)).detach()
    rec = Recording()
    calibrate_layerwise(model, [x], linears(model), rec, owner="test", sequential=sequential)
    assert rec.order == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    with torch.no_grad():
        pruned_out = torch.relu(first(x))  # the first layer is pruned to 50 % by now
    seen = rec.inputs["blocks.0.2"]
    torch.testing.assert_close(seen, pruned_out if sequential else dense_out)
    assert not torch.allclose(pruned_out, dense_out)


class PairedRows(Rows):
    """Statistics that keep every input row and the reference row paired with it."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[torch.Tensor] = []

    def update(self, columns: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        super().update(columns)
        self.references.append(reference)


class PairedRecording(Recording):
    def stats(self, name: str, module: nn.Module) -> PairedRows:
        return PairedRows()

    def process(self, name: str, module: nn.Module, stats: PairedRows) -> None:
        self.references = getattr(self, "references", {})
        self.references[name] = torch.cat(stats.references)
        super().process(name, module, stats)


@pytest.mark.parametrize("blocks", [True, False])
def test_asymmetric_pairs_each_input_with_the_unprocessed_models(blocks):
    torch.manual_seed(0)
    model, x = TwoLayerBlocks(), torch.randn(16, 8)
    if not blocks:  # a plain Sequential: the whole model is one block
        model = nn.Sequential(*model.blocks[0], *model.blocks[1])
    first_block = model.blocks[0] if blocks else model[:3]
    with torch.no_grad():
        dense = first_block(x)  # what the second block's first layer reads, unprocessed
    rec = PairedRecording()
    calibrate_layerwise(model, [x], linears(model), rec, owner="t", sequential=True,
                        asymmetric=True)  # fmt: skip
    first, third = (n for i, (n, _) in enumerate(linears(model)) if i in (0, 2))
    torch.testing.assert_close(rec.references[third], dense)  # the unprocessed model's rows
    with torch.no_grad():
        torch.testing.assert_close(rec.inputs[third], first_block(x))  # the processed model's
    assert not torch.allclose(rec.inputs[third], dense)
    torch.testing.assert_close(rec.references[first], rec.inputs[first])


def test_asymmetric_target_matches_the_unprocessed_output():
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g)
    reference = torch.randn(4096, 16, generator=g)
    drifted = reference @ mix + 0.05 * torch.randn(4096, 16, generator=g)  # processed inputs
    w = torch.randn(8, 16, generator=g)
    stats = Hessian(16, cross=True)
    stats.update(drifted, reference)
    target = asymmetric_target(w, stats, 0.01)

    def error(v: torch.Tensor) -> float:
        return float((reference @ w.T - drifted @ v.T).norm())

    assert error(target) < 0.25 * error(w)  # measured 0.19 (the noise is irreducible)
    same = Hessian(16, cross=True)
    same.update(reference, reference)
    torch.testing.assert_close(asymmetric_target(w, same, 0.01), w)  # no drift, no shift
    with pytest.raises(ValueError, match="reference rows"):
        same.update(reference)
