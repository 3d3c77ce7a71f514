"""Every registered technique passes the shared contract."""

from __future__ import annotations

import pytest

from modelpress.registry import technique_names
from modelpress.testing import check_technique, tiny_convnet

# technique -> (params, min cosine, artifact must shrink, has targets)
CASES = {
    "prune.magnitude": ({"sparsity": 0.5}, 0.95, True, True),
    "quant.rtn": ({"bits": 4, "group_size": 16}, 0.98, True, True),
    "train": ({"max_steps": 5, "lr": 1e-4}, 0.98, False, False),
}


def test_every_technique_has_a_contract_case():
    assert sorted(CASES) == technique_names()


@pytest.mark.parametrize(
    ("name", "model_kind"),
    [(n, "mlp") for n in sorted(CASES)]
    + [(n, "convnet") for n in ("prune.magnitude", "quant.rtn")],
)
def test_contract(name, model_kind, mlp, digits):
    params, min_cos, smaller, targeted = CASES[name]
    model = mlp if model_kind == "mlp" else tiny_convnet()  # the convnet is untrained
    min_cos = min_cos if model_kind == "mlp" else 0.9
    report = check_technique(
        name,
        params,
        model,
        digits,
        inputs=digits.test.tensors[0][:64],
        min_cosine=min_cos,
        expect_smaller=smaller,
        targeted=targeted,
    )
    assert report["cosine"] >= min_cos
    if smaller:
        assert report["bytes_after"] < report["bytes_before"]
