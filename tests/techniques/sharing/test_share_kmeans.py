"""share.kmeans: Deep Compression's per-layer k-means weight sharing and codebook fine-tuning."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

import modelpress as mp
from modelpress.artifact.manifest import MANIFEST
from modelpress.artifact.tensor_codec import decode_tensor, encode_tensor
from modelpress.config import parse_config
from modelpress.context import Context
from modelpress.errors import (
    ArtifactError,
    ConfigError,
    NoMatchingModulesError,
    UnsupportedModuleError,
)
from modelpress.measure import accuracy
from modelpress.parametrizations import add_parametrization, effective_tensor, find_parametrization
from modelpress.techniques.pruning.mask import set_mask
from modelpress.techniques.sharing.codebook import KMeansCodec, SharedWeight
from modelpress.techniques.sharing.kmeans import (
    KMeansConfig,
    apply_kmeans,
    assign_clusters,
    density_init,
    kmeans_1d,
    linear_init,
    share_weight,
)
from modelpress.testing import tiny_convnet


def _data(n: int = 3000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_matches_scikit_learn_from_the_same_linear_init(bits):
    x = _data()
    k = 1 << bits
    ours = kmeans_1d(x, bits, max_iter=500)
    ref = KMeans(n_clusters=k, init=linear_init(x, k).numpy()[:, None], n_init=1, max_iter=500,
                 tol=0.0, algorithm="lloyd").fit(x.numpy()[:, None])  # fmt: skip
    # the comparison holds while no cluster empties (scikit-learn would relocate it)
    assert int(torch.bincount(ours.labels, minlength=k).min()) > 0
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-9)
    assert np.array_equal(ours.labels.numpy(), ref.labels_)
    assert np.allclose(ours.centroids.numpy(), np.sort(ref.cluster_centers_[:, 0]), atol=1e-12)


def test_initialisations():
    x = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0])
    assert torch.equal(linear_init(x, 5), torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0]).double())
    assert torch.equal(density_init(x, 3), torch.tensor([-1.0, 0.5, 3.0]).double())


def test_assignment_is_the_nearest_centroid():
    x = _data(2000, seed=1)
    c = torch.sort(_data(16, seed=2)).values
    nearest = (x[:, None] - c[None, :]).abs().argmin(dim=1)
    assert torch.equal(assign_clusters(x, c), nearest)


def test_lloyd_stops_when_nothing_moves_and_lowers_inertia():
    x = _data()
    start = linear_init(x, 8)
    init_inertia = float(((x - start[assign_clusters(x, start)]) ** 2).sum())
    fit = kmeans_1d(x, 3, max_iter=1000)
    assert fit.iterations < 1000 and fit.inertia < 0.5 * init_inertia
    # a converged fit is a fixed point: the centroids are the means of their clusters
    means = torch.stack([x[fit.labels == i].mean() for i in range(8)])
    assert torch.allclose(fit.centroids, means, atol=1e-15)


def test_pruned_weights_stay_zero_and_only_kept_weights_are_clustered():
    torch.manual_seed(0)
    w = torch.randn(20, 30)
    w[w.abs() < 0.5] = 0
    shared, rec = share_weight(w, 2, KMeansConfig())
    kept = w != 0
    assert rec["kept"] == int(kept.sum()) and rec["k"] == 4
    assert torch.equal(shared.indices[~kept], torch.full_like(shared.indices[~kept], 4))
    out = shared(w).detach()
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert set(out[kept].unique().tolist()) <= set(shared.codebook.tolist())
    kept_values = w[kept]
    codebook = shared.codebook.tolist()
    assert codebook == sorted(codebook) and "codebook" not in rec  # the artifact holds it
    assert min(codebook) >= float(kept_values.min()) - 1e-6  # not pulled toward 0
    mse = float(((out[kept] - kept_values) ** 2).mean())
    assert rec["weight_mse"] == pytest.approx(mse, rel=1e-5)


def test_centroid_gradient_is_the_sum_of_its_cluster_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.05] = 0  # some pruned weights too
    shared, _ = share_weight(effective_tensor(layer), 3, KMeansConfig())
    add_parametrization(layer, "weight", shared)
    x, g = torch.randn(8, 30), torch.randn(8, 20)
    (layer(x) * g).sum().backward()
    grad_w = g.T @ x  # dL/dW of y = x W^T + b
    idx = shared.indices.long().reshape(-1)
    kept = idx < shared.k
    by_hand = torch.zeros(shared.k).index_add_(0, idx[kept], grad_w.reshape(-1)[kept])
    assert torch.allclose(shared.codebook.grad, by_hand, atol=1e-5)
    assert layer.parametrizations.weight.original.grad is None


def _share(model, digits, **params):
    return mp.compress(model, [mp.Stage.of("share.kmeans", **params)], data=digits, latency_runs=0)


def test_prune_finetune_share_finetune_keeps_indices_and_zeros(mlp, digits, tmp_path):
    stages = [mp.Stage.of("prune.magnitude", sparsity=0.8), mp.Stage.of("train", max_steps=30),
              mp.Stage.of("share.kmeans", bits=3)]  # fmt: skip
    shared = mp.compress(mlp, stages, data=digits, latency_runs=0).model
    before = {n: copy.deepcopy(find_parametrization(m, "weight", SharedWeight))
              for n, m in shared.named_modules() if n in ("fc1", "fc2", "fc3")}  # fmt: skip
    tuned = mp.compress(shared, [mp.Stage.of("train", epochs=3, lr=1e-3)], data=digits,
                        latency_runs=0)  # fmt: skip
    test = digits.loader("test", batch_size=256)
    assert accuracy(tuned.model, test) > accuracy(shared, test)  # the codebook fine-tune helps
    for name, old in before.items():
        module = tuned.model.get_submodule(name)
        new = find_parametrization(module, "weight", SharedWeight)
        assert torch.equal(new.indices, old.indices)  # indices never change
        assert not torch.equal(new.codebook, old.codebook)  # the codebook was trained
        w = effective_tensor(module)
        assert torch.equal(w, new.table().detach()[new.indices.long()])
        assert torch.equal(w == 0, old.indices == old.k)  # pruned stay pruned, kept stay kept
        assert w.unique().numel() <= 9
    path = tuned.save(tmp_path / "dc")
    x = digits.test.tensors[0][:100]
    assert torch.equal(mp.load(path)(x), tuned.model(x))
    records = json.loads((path / MANIFEST).read_text())["tensors"]
    assert records["fc1.weight"]["codec"] == {"name": "kmeans", "bits": 3,
                                              "codebook_dtype": "float32"}  # fmt: skip
    assert records["fc1.weight"]["packing"]["bits"] == 3
    assert records["fc1.weight"]["layout"]["format"] != "dense"


def test_report_per_layer(mlp, digits):
    learned = _share(mlp, digits, bits=4).stages[0].learned["layers"]
    assert sorted(learned) == ["fc1", "fc2", "fc3"]
    for rec in learned.values():
        assert rec["k"] == 16 and 1 <= rec["clusters_used"] <= 16 and 0 < rec["weight_mse"] < 1e-3


def test_layer_bits_per_layer_type(digits):
    result = _share(tiny_convnet(), digits, bits=4, layer_bits={"Conv2d": 8})
    layers = result.stages[0].learned["layers"]
    assert {n: r["k"] for n, r in layers.items()} == {"conv1": 256, "conv2": 256, "fc": 16}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_codec_round_trips_every_layout(dtype):
    """Dense with pruned zeros (the extra zero code), sparse, and a mask added after sharing."""
    torch.manual_seed(0)
    for sparsity in (0.0, 0.1, 0.9):
        layer = nn.Linear(40, 30)
        with torch.no_grad():
            layer.weight[torch.rand(30, 40) < sparsity] = 0
        cfg = KMeansConfig(codebook_dtype=dtype)
        shared, _ = share_weight(effective_tensor(layer), 2, cfg)
        add_parametrization(layer, "weight", shared)
        if sparsity == 0.0:  # prune after sharing: a later mask zeroes clustered weights
            set_mask(layer, "weight", torch.rand(30, 40) > 0.05)
        w = effective_tensor(layer)
        record, payloads = encode_tensor("w", w, shared.value_codec())
        assert torch.equal(decode_tensor("w", record, payloads), w)
        assert payloads["w/codebook"].dtype == getattr(torch, dtype)
        zeros_stored = record["layout"]["format"] == "dense" and bool((w == 0).any())
        assert record["packing"]["bits"] == (3 if zeros_stored else 2)
        if sparsity > 0:  # pruned at sharing time: a bitmask beats storing the zero code
            assert record["layout"]["format"] != "dense"
        if dtype == "float16":
            assert torch.equal(w, w.half().float())


def test_value_bits_make_the_layout_comparison_exact():
    codebook = torch.arange(4.0)
    assert KMeansCodec(2, "float32", codebook, torch.tensor([0, 1, 2, 3])).value_bits() == 2.0
    # 1 pruned of 4: dense stores 4 x 3 bits, a sparse layout 3 x 2 bits + its index,
    # and charging 2 + 4/1 bits per value gives the same difference
    codec = KMeansCodec(2, "float32", codebook, torch.tensor([0, 4, 2, 3]))
    v = codec.value_bits()
    assert v == 6.0 and 4 * v - 3 * v == 4 * 3 - 3 * 2


def test_values_off_the_codebook_are_refused():
    codec = KMeansCodec(2, "float32", torch.tensor([-1.0, 0.5, 1.0, 2.0]), torch.tensor([0, 3]))
    with pytest.raises(ArtifactError, match="holds values off its codebook"):
        codec.encode(torch.tensor([-1.0, 2.5]), None, (2,))


def test_a_corrupt_code_is_an_artifact_error():
    payloads = {"codebook": torch.tensor([0.5, 1.0])}
    with pytest.raises(ArtifactError, match="kmeans code 3 is past the 2-entry codebook"):
        KMeansCodec.decode({"bits": 1}, payloads, np.array([0, 3]), None, (2,))


def test_same_weights_same_codebook(mlp):
    a, b = _copy_share(mlp), _copy_share(mlp)
    for name in ("fc1", "fc2", "fc3"):
        pa = find_parametrization(a.get_submodule(name), "weight", SharedWeight)
        pb = find_parametrization(b.get_submodule(name), "weight", SharedWeight)
        assert torch.equal(pa.codebook, pb.codebook) and torch.equal(pa.indices, pb.indices)


def _copy_share(model: nn.Module) -> nn.Module:
    return apply_kmeans(copy.deepcopy(model), KMeansConfig(bits=3), Context())


def test_quantized_or_shared_layers_are_refused(mlp, digits):
    stages = [mp.Stage.of("quant.rtn", bits=4, targets=["fc2"]), mp.Stage.of("share.kmeans")]
    with pytest.raises(UnsupportedModuleError, match=r"fc2: already quantized or shared by an "
                       r"earlier stage \(AffineFakeQuant\); share.kmeans does not mix codecs"):  # fmt: skip
        mp.compress(mlp, stages, data=digits, latency_runs=0)
    twice = [mp.Stage.of("share.kmeans", targets=["fc1"]), mp.Stage.of("share.kmeans")]
    with pytest.raises(UnsupportedModuleError, match=r"fc1: already quantized or shared by an "
                       r"earlier stage \(SharedWeight\)"):  # fmt: skip
        mp.compress(mlp, twice, data=digits, latency_runs=0)


def test_quantizing_a_shared_layer_is_refused(mlp, digits):
    stages = [mp.Stage.of("share.kmeans"), mp.Stage.of("quant.rtn", bits=4)]
    with pytest.raises(UnsupportedModuleError, match="fc1: already quantized by an earlier stage"):
        mp.compress(mlp, stages, data=digits, latency_runs=0)


def test_bad_layer_bits_are_rejected(mlp):
    with pytest.raises(ConfigError, match=r"The 'layer_bits' parameter of share.kmeans must be a "
                       r"mapping\. Got \{'fc1': 9\} instead \(layer_bits\['fc1'\] = 9 is not in "
                       r"\[1, 8\]\)\."):  # fmt: skip
        parse_config(KMeansConfig, {"layer_bits": {"fc1": 9}}, owner="share.kmeans")
    with pytest.raises(NoMatchingModulesError, match="share.kmeans: layer_bits selector 'Conv2d' "
                       "matches none of the selected layers"):  # fmt: skip
        apply_kmeans(mlp, KMeansConfig(layer_bits={"Conv2d": 8}), Context())
    assert find_parametrization(mlp.fc1, "weight", SharedWeight) is None


def test_all_zero_layers_are_skipped_and_reported(mlp):
    with torch.no_grad():
        mlp.fc3.weight.zero_()
    ctx = Context()
    apply_kmeans(mlp, KMeansConfig(bits=2), ctx)
    assert ctx.reports["skipped"] == {"fc3": "every weight is zero"}
    assert find_parametrization(mlp.fc3, "weight", SharedWeight) is None
    with pytest.raises(UnsupportedModuleError, match="every selected weight is all zeros"):
        apply_kmeans(mlp, KMeansConfig(targets=["fc3"]), Context())


def test_shared_codes_compose_with_entropy_coding(mlp, digits, tmp_path):
    base = [mp.Stage.of("prune.magnitude", sparsity=0.8), mp.Stage.of("share.kmeans", bits=4)]
    x = digits.test.tensors[0][:100]
    sizes = {}
    for extra in ((), (mp.Stage.of("encode.ans"),)):
        result = mp.compress(mlp, [*base, *extra], data=digits, latency_runs=0)
        path = result.save(tmp_path / f"dc{len(extra)}")
        assert torch.equal(mp.load(path)(x), result.model(x))
        sizes[len(extra)] = (path / "tensors.safetensors").stat().st_size
    assert sizes[1] < sizes[0]
