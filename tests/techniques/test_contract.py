"""Every registered technique passes the shared contract."""

from __future__ import annotations

import pytest

from modelpress.recipe import Stage
from modelpress.registry import technique_names
from modelpress.testing import check_technique, tiny_convnet

# technique -> params, min output cosine, artifact must shrink, has targets, stages after it
CASES = {
    "prune.magnitude": ({"sparsity": 0.5}, 0.95, True, True, ()),
    "prune.random": ({"sparsity": 0.2}, 0.8, True, True, ()),
    "prune.nm": ({"n": 2, "m": 4}, 0.9, True, True, ()),
    "prune.gradual": ({"sparsity": 0.5, "frequency": 2}, 0.9, True, True, ("train",)),
    "prune.wanda": ({"sparsity": 0.5, "n_samples": 64}, 0.9, True, True, ()),
    "prune.sparsegpt": ({"sparsity": 0.5, "n_samples": 64}, 0.95, True, True, ()),
    "prune.structured": ({"sparsity": 0.25}, 0.9, True, True, ()),
    "quant.rtn": ({"bits": 4, "group_size": 16}, 0.98, True, True, ()),
    "quant.gptq": ({"bits": 4, "group_size": 16, "n_samples": 64}, 0.98, True, True, ()),
    "quant.cast": ({"dtype": "float16"}, 0.999, True, True, ()),
    "quant.mixed": (
        {"ratio": 5, "candidate_bits": [2, 4, 8], "group_size": 16, "n_samples": 64},
        0.98,
        True,
        True,
        (),
    ),
    "quant.awq": ({"bits": 4, "group_size": 16, "n_samples": 64}, 0.98, True, True, ()),
    "quant.hqq": ({"bits": 4, "group_size": 16}, 0.98, True, True, ()),
    "quant.qat": (
        {"method": "lsq", "weight_bits": 4, "activation_bits": 8, "calibration_samples": 64},
        0.98,
        True,
        True,
        ("train",),
    ),
    "quant.binary": ({}, 0.85, True, True, ("train",)),
    "quant.ternary": ({}, 0.93, True, True, ("train",)),
    "quant.int8_dynamic": ({}, 0.999, True, True, ()),
    "quant.int8_static": ({"smoothquant_alpha": 0.5, "n_samples": 64}, 0.999, True, True, ()),
    "train": ({"max_steps": 5, "lr": 1e-4}, 0.98, False, False, ()),
    "distill.kd": ({"temperature": 4.0, "alpha": 0.9}, 0.98, False, False, ("train",)),
    "distill.hint": ({"pairs": {"fc2": "fc2"}, "loss": "cosine"}, 0.98, False, False, ("train",)),
    # needs self-attention: its contract runs on a tiny BERT in distillation/test_attention.py
    "distill.attention": ({"task_weight": 0}, 0.98, False, False, ("train",)),
    # early-exited samples take a head's logits, so the outputs are only loosely the original's
    "early_exit.branches": ({"exits": ["relu1"]}, 0.8, False, False, ("train",)),
    "architecture.shrink": ({"width": 0.75}, 0.9, True, True, ()),
    "architecture.separable": ({"multiplier": 1}, 0.9, True, True, ()),
    # conv-only: run on the untrained convnet (cosine bound 0.85 there)
    "lowrank.tucker": ({"rank_ratio": 0.5}, 0.9, True, True, ()),
    "lowrank.cp": ({"rank_ratio": 0.5}, 0.9, True, True, ()),
    "lowrank.svd": ({"params_ratio": 0.5}, 0.99, True, True, ()),
    # rank-16 TT cores fit a trained layer loosely (fit error ~0.55) without retraining
    "lowrank.tt": ({"max_rank": 16}, 0.9, True, True, ()),
    # weights unchanged; the float MLP has no integer payload to code (sizes: tests/artifact)
    "encode.huffman": ({"payloads": "all"}, 0.9999, False, False, ()),
    "encode.ans": ({"payloads": "all"}, 0.9999, False, False, ()),
    "share.kmeans": ({"bits": 4}, 0.98, True, True, ()),
    # a trained layer is poorly fitted by 1/2 as many shared weights until it is retrained
    "share.hash": ({"compression": 0.5}, 0.5, True, True, ("train",)),
}
# the convnet's first conv has one input channel: N:M cannot group it
CONVNET_EXTRA = {"prune.nm": {"ignore": ["conv1"]}, "prune.gradual": {}}
# techniques with nothing to act on in the MLP (it has no convolutions): convnet only
CONVNET_ONLY = {"architecture.separable", "lowrank.tucker", "lowrank.cp"}
# techniques with nothing to act on in the MLP or the convnet (transformer only): own test
TRANSFORMER_ONLY = {"distill.attention"}


def test_every_technique_has_a_contract_case():
    assert sorted(CASES) == technique_names()


@pytest.mark.parametrize(
    ("name", "model_kind"),
    [(n, "mlp") for n in sorted(CASES) if n not in CONVNET_ONLY | TRANSFORMER_ONLY]
    + [
        (n, "convnet")
        for n in (
            "prune.magnitude",
            "prune.nm",
            "prune.gradual",
            "prune.structured",
            "prune.wanda",
            "prune.sparsegpt",
            "quant.rtn",
            "quant.gptq",
            "quant.cast",
            "quant.mixed",
            "quant.hqq",
            "quant.qat",
            "quant.binary",
            "quant.ternary",
            "quant.int8_static",
            "architecture.shrink",
            "architecture.separable",
            "lowrank.tucker",
            "lowrank.cp",
            "share.kmeans",
        )
    ],
)
def test_contract(name, model_kind, mlp, digits):
    params, min_cos, smaller, targeted, after = CASES[name]
    model = mlp if model_kind == "mlp" else tiny_convnet()  # the convnet is untrained
    if model_kind == "convnet":
        params, min_cos = {**params, **CONVNET_EXTRA.get(name, {})}, 0.85
    report = check_technique(
        name,
        params,
        model,
        digits,
        inputs=digits.test.tensors[0][:64],
        min_cosine=min_cos,
        expect_smaller=smaller,
        targeted=targeted,
        followed_by=[Stage.of(t, max_steps=10, lr=1e-4) for t in after],
    )
    assert report["cosine"] >= min_cos
    if smaller:
        assert report["bytes_after"] < report["bytes_before"]
