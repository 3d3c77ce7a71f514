"""Distillation losses on one teacher share its forward: one teacher pass per training step."""

from __future__ import annotations

import copy

import torch

import modelpress as mp
from modelpress.techniques.distillation import teacher as teacher_module


def teacher_calls(trained, stages: list[mp.Stage]) -> tuple[int, mp.Result, torch.nn.Module]:
    """How many times the teacher ran in ``compress(student, stages)``, the result and the
    teacher."""
    model, digits = trained
    teacher, student = copy.deepcopy(model).eval(), copy.deepcopy(model)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    result = mp.compress(student, stages, data=digits, teacher=teacher, latency_runs=0)
    return len(calls), result, teacher


def test_kd_and_hint_in_one_recipe_run_the_teacher_once_per_step(trained):
    train = mp.Stage.of("train", epochs=1, lr=1e-3)
    kd = mp.Stage.of("distill.kd")
    hint = mp.Stage.of("distill.hint", pairs={"relu1": "relu1"})
    alone, _, _ = teacher_calls(trained, [kd, train])
    both, result, teacher = teacher_calls(trained, [kd, hint, train])
    assert alone >= 20  # one pass per step (and a probe or two)
    assert both <= alone + 2  # not twice: hint's own probe at most
    learned = result.stages[-1].learned
    assert learned["kd_loss"]["last"] > 0 and learned["hint_loss"]["last"] >= 0
    assert teacher not in teacher_module._PASSES  # released when training ends


def test_the_shared_pass_gives_each_loss_what_running_the_teacher_alone_gives(trained):
    model, digits = trained
    x, y = digits.test.tensors[0][:32], digits.test.tensors[1][:32]
    teacher = copy.deepcopy(model).eval()
    taps = {"relu1": teacher.relu1}
    shared = teacher_module._TeacherPass()
    shared.join(taps)
    state = type("State", (), {"step": 3})()
    out, feats = shared.run(teacher, state, (x, y))
    alone_out, alone_feats = teacher_module.run_frozen(teacher, (x, y), taps)
    assert torch.equal(out, alone_out) and torch.equal(feats["relu1"], alone_feats["relu1"])
    shared.leave(taps)
    assert shared.taps == {} and shared.members == 0
