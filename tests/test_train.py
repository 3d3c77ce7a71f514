"""The one training loop: schedules, callbacks, determinism, divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelpress.context import Context
from modelpress.errors import TrainingError
from modelpress.measure import accuracy
from modelpress.train import Callback, TrainConfig, fit, lr_at, make_optimizer, train_model


def test_cosine_and_constant_schedules():
    cfg = TrainConfig(lr=1.0, schedule="cosine")
    assert lr_at(0, 10, cfg) == 1.0 and lr_at(5, 10, cfg) == pytest.approx(0.5)
    assert lr_at(10, 10, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(7, 10, TrainConfig(lr=0.3, schedule="constant")) == 0.3


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_optimizers(name, cls):
    assert isinstance(make_optimizer(nn.Linear(2, 2), TrainConfig(optimizer=name)), cls)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_begin(self, state):
        self.events.append("begin")

    def on_step_end(self, state):
        self.events.append(f"step{state.step}")

    def on_epoch_end(self, state):
        self.events.append("epoch")

    def on_train_end(self, state):
        self.events.append("end")

    def loss(self, state, batch, outputs, loss):
        return loss * 0  # a callback may replace the loss


def test_callbacks_run_in_order_and_can_change_the_loss(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = model[1].weight.clone()
    rec = Recorder()
    summary = fit(model, TrainConfig(max_steps=3, epochs=1), Context(data=digits), [rec])
    assert rec.events == ["begin", "step1", "step2", "step3", "epoch", "end"]
    assert summary["steps"] == 3 and summary["final_loss"] == 0.0
    assert torch.equal(model[1].weight, before)  # zero loss: no update


def test_same_seed_same_weights(digits):
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.2), nn.Linear(32, 10))
        train_model(model, digits, epochs=1, seed=5)
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    summary = train_model(model, digits, epochs=8, lr=2e-2)
    assert summary["steps"] == 8 * math.ceil(1437 / 64)
    assert accuracy(model, digits.loader("test", 256)) > 0.9


def test_divergence_is_a_clear_error(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"train: the loss became nan at step 0; lower 'lr'"):
        train_model(model, digits, max_steps=2)


def test_unlabelled_data_cannot_train():
    from modelpress.errors import DataError

    batches = [torch.randn(4, 3)]
    with pytest.raises(DataError, match="training needs labelled batches"):
        train_model(nn.Linear(3, 2), batches, max_steps=1)


def test_a_callback_can_replace_the_task_loss_so_unlabelled_data_trains():
    class MatchZero(Callback):
        replaces_task_loss = True

        def loss(self, state, batch, outputs, loss):
            return loss + outputs.pow(2).mean()

    model = nn.Linear(3, 2)
    batches = [torch.randn(16, 3, generator=torch.Generator().manual_seed(0))]
    ctx = Context(batches=batches)
    before = model(batches[0]).pow(2).mean().item()
    fit(model, TrainConfig(epochs=50, lr=0.05), ctx, [MatchZero()])
    assert model(batches[0]).pow(2).mean().item() < before / 10
