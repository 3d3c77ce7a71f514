"""share.hash: HashedNets layers (Chen et al. 2015) and the MurmurHash3 they hash with."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.artifact.manifest import MANIFEST, TENSORS
from modelpress.context import Context
from modelpress.edits import replay_edits
from modelpress.errors import ArtifactError, UnsupportedModuleError
from modelpress.measure import accuracy, count_params
from modelpress.techniques.sharing.hashing import (
    HashConfig,
    HashedConv2d,
    HashedLinear,
    apply_hash,
    bucket_average,
    hash_buckets,
    layer_key,
)
from modelpress.techniques.sharing.murmur import murmur3_32
from modelpress.testing import tiny_convnet


def murmur3_reference(data: bytes, seed: int) -> int:
    """A plain scalar MurmurHash3_x86_32 over bytes (whole 4-byte blocks), for cross-checks."""
    m = 0xFFFFFFFF
    h = seed
    for (k,) in struct.iter_unpack("<I", data):
        k = (k * 0xCC9E2D51) & m
        k = ((k << 15) | (k >> 17)) & m
        k = (k * 0x1B873593) & m
        h ^= k
        h = ((h << 13) | (h >> 19)) & m
        h = (h * 5 + 0xE6546B64) & m
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def _hash(words: list[int], seed: int) -> int:
    return int(murmur3_32(torch.tensor(words, dtype=torch.int64).reshape(1, len(words)), seed)[0])


# the published SMHasher vectors for MurmurHash3_x86_32 (little-endian 32-bit words)
VECTORS = [
    ([], 0, 0),
    ([], 1, 0x514E28B7),
    ([], 0xFFFFFFFF, 0x81F16F39),
    ([0xFFFFFFFF], 0, 0x76293B50),
    ([0x87654321], 0, 0xF55B516B),
    ([0x87654321], 0x5082EDEE, 0x2362F9DE),
    ([0x00000000], 0, 0x2362F9DE),
    ([0x61616161], 0x9747B28C, 0x5A97808A),  # "aaaa"
    ([0x64636261], 0x9747B28C, 0xF0478627),  # "abcd"
]


@pytest.mark.parametrize(("words", "seed", "expected"), VECTORS)
def test_murmur3_matches_the_published_test_vectors(words, seed, expected):
    assert _hash(words, seed) == expected
    assert murmur3_reference(struct.pack(f"<{len(words)}I", *words), seed) == expected


def test_murmur3_vectorised_equals_the_scalar_reference():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (200, 4), generator=gen, dtype=torch.int64)
    got = murmur3_32(words, 0xDEADBEEF).tolist()
    want = [murmur3_reference(struct.pack("<4I", *row), 0xDEADBEEF) for row in words.tolist()]
    assert got == want


def test_hash_gives_fixed_known_buckets_and_signs():
    """Golden values computed once: a change here changes every saved hashed model."""
    assert layer_key("fc1") == 2887079646 and layer_key("features.0") == 2190298066
    bucket, sign = hash_buckets(seed=0, key=layer_key("fc1"), rows=4, cols=5, buckets=1000)
    golden = [(0, 0, 425, -1), (0, 1, 954, 1), (1, 0, 880, -1), (2, 3, 256, -1), (3, 4, 767, -1)]
    assert [(i, j, int(bucket[i, j]), int(sign[i, j])) for i, j, _, _ in golden] == golden
    # rows past 2^16 and a chunked computation
    bucket, sign = hash_buckets(seed=12345, key=layer_key("fc1"), rows=70000, cols=3, buckets=97)
    assert (int(bucket[65536, 0]), int(sign[65536, 0])) == (16, 1)
    assert (int(bucket[69999, 2]), int(sign[69999, 2])) == (81, 1)


def test_hash_spreads_evenly_and_signs_are_balanced():
    bucket, sign = hash_buckets(0, layer_key("fc1"), 300, 784, 29400)
    counts = torch.bincount(bucket.flatten(), minlength=29400).float()
    assert counts.mean() == 8.0 and 2.5 < counts.std() < 3.2  # Poisson(8): std sqrt(8)
    assert abs(float((sign == 1).float().mean()) - 0.5) < 0.01


def _linear(rows: int = 5, cols: int = 7, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(cols, rows)


def test_virtual_weight_is_sign_times_hashed_real_weight():
    layer = HashedLinear(7, 5, 6, seed=3, key=11)
    with torch.no_grad():
        layer.hashed_weight.copy_(torch.arange(1.0, 7.0))
    bucket, sign = hash_buckets(3, 11, 5, 7, 6)
    assert torch.equal(layer.virtual_weight(), sign * layer.hashed_weight.detach()[bucket])
    x = torch.randn(4, 7)
    assert torch.allclose(layer(x), F.linear(x, layer.virtual_weight(), layer.bias))


def test_average_init_is_the_least_squares_fit():
    weight = torch.randn(5, 7, dtype=torch.float64)
    bucket, sign = hash_buckets(0, 1, 5, 7, 6)
    w, empty = bucket_average(weight, bucket, sign, 6)
    design = torch.zeros(35, 6, dtype=torch.float64)  # V = A w
    design[torch.arange(35), bucket.flatten()] = sign.flatten().double()
    lstsq = torch.linalg.lstsq(design, weight.flatten()[:, None]).solution[:, 0]
    assert empty == 0 and torch.allclose(w, lstsq, atol=1e-12)


def test_gradient_of_each_real_weight_sums_its_virtual_gradients():
    layer = HashedLinear(7, 5, 6, seed=0, key=1)
    with torch.no_grad():
        layer.hashed_weight.normal_()
    x, g = torch.randn(4, 7), torch.randn(4, 5)
    (layer(x) * g).sum().backward()
    grad_v = g.T @ x  # dL/dV for y = x V^T + b
    bucket, sign = hash_buckets(0, 1, 5, 7, 6)
    by_hand = torch.zeros(6).index_add_(0, bucket.flatten(), (sign * grad_v).flatten())
    assert torch.allclose(layer.hashed_weight.grad, by_hand, atol=1e-5)


def test_conversion_sizes_and_fit(mlp):
    before = {
        n: m.weight.detach().clone() for n, m in mlp.named_modules() if isinstance(m, nn.Linear)
    }
    ctx = Context()
    model = apply_hash(_mlp_of(mlp), HashConfig(compression=1 / 8), ctx)
    layers = ctx.reports["layers"]
    for name, weight in before.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, HashedLinear)
        assert layer.buckets == math.ceil(weight.numel() / 8) == layers[name]["buckets"]
        err = (layer.virtual_weight().detach() - weight).norm() / weight.norm()
        assert float(err) == pytest.approx(layers[name]["fit_error"], abs=1e-5)
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, HashedLinear))
    assert count_params(model) == sum(math.ceil(w.numel() / 8) for w in before.values()) + biases
    model = apply_hash(_mlp_of(mlp), HashConfig(buckets=100), Context())
    assert all(m.buckets == 100 for m in model.modules() if isinstance(m, HashedLinear))


def _mlp_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_average_init_fits_better_than_random(mlp):
    reports = {}
    for init in ("average", "random"):
        ctx = Context(seed=0)
        apply_hash(_mlp_of(mlp), HashConfig(compression=0.5, init=init), ctx)
        reports[init] = ctx.reports["layers"]
    for name, rec in reports["average"].items():
        # ~2 weights per bucket: the average keeps ~half the energy; random is worse than 0
        assert rec["fit_error"] < 0.8 and reports["random"][name]["fit_error"] > 1.0


def test_save_load_rebuilds_the_hashed_layers_and_stores_only_real_weights(mlp, digits, tmp_path):
    stages = [mp.Stage.of("share.hash", compression=1 / 8, seed=7),
              mp.Stage.of("train", max_steps=20, lr=1e-3)]  # fmt: skip
    result = mp.compress(mlp, stages, data=digits, latency_runs=0)
    path = result.save(tmp_path / "hashed")
    loaded = mp.load(path)
    x = digits.test.tensors[0][:100]
    assert torch.equal(loaded(x), result.model(x))
    for name in ("fc1", "fc2", "fc3"):
        a, b = result.model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, HashedLinear) and (b.buckets, b.seed, b.key) == (a.buckets, 7, a.key)
        assert torch.equal(a.index, b.index)
    manifest = json.loads((path / MANIFEST).read_text())
    assert sorted(manifest["tensors"]) == sorted(
        f"fc{i}.{t}" for i in (1, 2, 3) for t in ("bias", "hashed_weight")
    )
    dense = mp.save(mlp, tmp_path / "dense")
    weights = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    biases = sum(m.bias.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    hashed_bytes, dense_bytes = (path / TENSORS).stat().st_size, (dense / TENSORS).stat().st_size
    assert dense_bytes > 4 * (weights + biases)
    # ~1/8 of the weights' bytes, plus the unhashed biases and the safetensors header
    assert hashed_bytes < 4 * (math.ceil(weights / 8) + 3 + biases) + 1024
    assert hashed_bytes < 0.16 * dense_bytes


def test_random_init_trains_from_scratch(digits):
    torch.manual_seed(0)
    model = mp.load_model("zoo:mlp", input_shape=list(digits.input_shape), num_classes=10)
    stages = [mp.Stage.of("share.hash", compression=1 / 4, init="random"),
              mp.Stage.of("train", epochs=8, lr=3e-3)]  # fmt: skip
    result = mp.compress(model, stages, data=digits, latency_runs=0)
    assert result.stages[0].metrics["eval"]["accuracy"] < 0.3  # untrained
    assert accuracy(result.model, digits.loader("test", batch_size=256)) > 0.9


@pytest.mark.parametrize("groups", [1, 2])
def test_hashed_conv2d_computes_the_conv_with_its_virtual_kernel(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=groups)
    layer = HashedConv2d(conv, 20, seed=1, key=2)
    with torch.no_grad():
        layer.hashed_weight.normal_()
    kernel = layer.virtual_weight()
    assert kernel.shape == conv.weight.shape
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(layer(x), F.conv2d(x, kernel, layer.bias, 2, 1, 1, groups))


def test_convnet_with_hashed_convs_saves_and_loads(digits, tmp_path):
    model = tiny_convnet()
    stage = mp.Stage.of("share.hash", targets=["Conv2d", "Linear"], compression=0.5)
    result = mp.compress(model, [stage], data=digits, latency_runs=0)
    assert isinstance(result.model.conv1, HashedConv2d) and result.model.conv1.buckets == 36
    assert isinstance(result.model.conv2, HashedConv2d) and result.model.conv2.buckets == 576
    assert isinstance(result.model.fc, HashedLinear)
    loaded = mp.load(result.save(tmp_path / "conv"))
    x = digits.test.tensors[0][:32]
    assert torch.equal(loaded(x), result.model(x))


def test_layers_that_would_not_shrink_are_skipped_and_reported(mlp):
    ctx = Context()
    apply_hash(mlp, HashConfig(buckets=1000), ctx)  # fc3 has 640 weights
    assert ctx.reports["skipped"] == {"fc3": "K=1000 real weights would not be fewer than 640"}
    assert isinstance(mlp.fc3, nn.Linear) and isinstance(mlp.fc1, HashedLinear)


def test_nothing_hashable_is_an_error_and_changes_nothing(mlp):
    with pytest.raises(UnsupportedModuleError, match=r"no selected layer can be hashed; e\.g\. "
                       r"fc1: K=100000 real weights would not be fewer than 8192"):  # fmt: skip
        apply_hash(mlp, HashConfig(buckets=100_000), Context())
    assert isinstance(mlp.fc1, nn.Linear)


def test_reflect_padding_conv_is_skipped(digits):
    conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(conv)
    with pytest.raises(UnsupportedModuleError, match="padding_mode='reflect'"):
        apply_hash(model, HashConfig(targets=["Conv2d"]), Context())


def test_masked_layer_is_refused_before_any_change(mlp, digits):
    stages = [mp.Stage.of("prune.magnitude", sparsity=0.5, targets=["fc2"]),
              mp.Stage.of("share.hash")]  # fmt: skip
    with pytest.raises(UnsupportedModuleError, match="fc2: carries a mask or quantizer; run "
                       "share.hash before techniques that mask or quantize weights"):  # fmt: skip
        mp.compress(mlp, stages, data=digits, latency_runs=0)


def test_replay_onto_a_different_layer_type_is_an_artifact_error():
    edit = {"op": "hashed", "layers": {"0": {"kind": "conv2d", "buckets": 4, "seed": 0, "key": 1}}}
    with pytest.raises(ArtifactError, match="0: the hashed edit expects a Conv2d, the rebuilt "
                       "model has a Linear"):  # fmt: skip
        replay_edits(nn.Sequential(nn.Linear(3, 3)), [edit])


def test_linear_subclasses_used_through_weight_are_skipped():
    """MultiheadAttention reads out_proj.weight itself: replacing out_proj would break it."""
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.ModuleDict({"attn": attn, "fc": nn.Linear(8, 64)})
    ctx = Context()
    apply_hash(model, HashConfig(), ctx)
    assert ctx.reports["skipped"] == {
        "attn.out_proj": "NonDynamicallyQuantizableLinear: a subclass, its parent may use "
        ".weight directly"
    }
    assert isinstance(model["fc"], HashedLinear)
    x = torch.randn(2, 3, 8)
    assert attn(x, x, x)[0].shape == (2, 3, 8)
