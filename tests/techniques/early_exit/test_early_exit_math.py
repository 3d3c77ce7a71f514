"""early_exit maths: heads, exit criteria, the greedy calibration and the joint loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modelpress.techniques.early_exit.branches import exit_loss
from modelpress.techniques.early_exit.calibrate import (
    cascade_summary,
    cut_threshold,
    greedy_thresholds,
    loosest_cut,
)
from modelpress.techniques.early_exit.heads import (
    ExitHead,
    confidence,
    entropy,
    exits_now,
    init_head,
    max_prob,
)


def test_entropy_and_max_prob_match_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-12, 1e-12]]))
    assert entropy(logits).tolist() == pytest.approx([1.5 * math.log(2), 0.0], abs=1e-6)
    assert max_prob(logits).tolist() == pytest.approx([0.5, 1.0], abs=1e-6)
    assert exits_now(logits, "entropy", 0.5).tolist() == [False, True]
    assert exits_now(logits, "max_prob", 0.5).tolist() == [True, True]
    assert torch.equal(confidence(logits, "entropy"), -entropy(logits))


@pytest.mark.parametrize(("shape", "width"), [((3, 6, 5, 7), 6 * 4), ((3, 9, 6), 6), ((3, 6), 6)])
def test_head_pools_images_averages_tokens_and_reads_vectors(shape, width):
    rank, channels = len(shape), shape[-1] if len(shape) == 3 else shape[1]
    head = ExitHead(rank, channels, num_classes=4, pool=2, hidden=0)
    assert head.fc.in_features == width
    x = torch.randn(shape)
    expected = {
        4: lambda: F.adaptive_avg_pool2d(x, 2).flatten(1),
        3: lambda: x.mean(1),
        2: lambda: x,
    }[rank]()
    assert torch.allclose(head(x), head.fc(expected), atol=1e-6)


def test_head_init_is_seeded_and_hidden_layer_is_used():
    a = init_head(ExitHead(2, 8, 3, hidden=5), torch.Generator().manual_seed(1))
    b = init_head(ExitHead(2, 8, 3, hidden=5), torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.hidden is not None and a.hidden.weight.abs().max() <= 1 / math.sqrt(8)
    x = torch.randn(4, 8)
    assert torch.allclose(a(x), a.fc(torch.relu(a.hidden(x))))


def test_loosest_cut_takes_the_largest_cut_that_keeps_the_count_and_splits_no_tie():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.5, 0.1])
    gain = torch.tensor([0, -1, 0, 0, -1])  # exiting sample 1 loses one correct answer
    assert loosest_cut(scores, gain, 0) == 1  # letting sample 1 go costs a correct answer
    assert loosest_cut(scores, gain, -1) == 4  # one loss allowed: all but the last
    assert loosest_cut(scores, gain, -2) == 5
    assert loosest_cut(scores, gain, 1) == 0  # unreachable: the exit stays disabled
    tied = torch.tensor([0.7, 0.7, 0.7])
    assert loosest_cut(tied, torch.tensor([0, 0, -1]), 0) == 0  # no cut inside the tie


def test_cut_threshold_lets_exactly_k_leave():
    scores = torch.tensor([0.9, 0.6, 0.6, 0.2])
    assert cut_threshold(scores, 0) is None
    for k in (1, 3, 4):
        tau = cut_threshold(scores, k)
        assert int((scores >= tau).sum()) == k


def test_greedy_thresholds_keep_the_cascade_at_the_target_exactly():
    gen = torch.Generator().manual_seed(0)
    n = 400
    scores = torch.rand(2, n, generator=gen)
    # exits are right more often when confident; the final output is right 90% of the time
    correct = torch.stack(
        [
            torch.rand(n, generator=gen) < 0.5 + 0.5 * scores[0],
            torch.rand(n, generator=gen) < 0.6 + 0.4 * scores[1],
            torch.rand(n, generator=gen) < 0.9,
        ]
    )
    needed = int(correct[2].sum())
    taus, exit_at = greedy_thresholds(scores, correct, needed)
    # the thresholds reproduce the assignment: first exit whose score clears its threshold
    redo = torch.full((n,), 2)
    for i in (1, 0):
        if taus[i] is not None:
            redo[scores[i] >= taus[i]] = i
    assert torch.equal(redo, exit_at)
    summary = cascade_summary(correct, exit_at)
    assert summary["cascade_accuracy"] * n >= needed - 1e-9
    assert 0 < summary["exit_fractions"][0] < 1  # the first exit really takes samples
    # loosest: every larger cut of exit 0 (exit 1 not chosen yet) misses the target
    order = torch.argsort(scores[0], descending=True)
    s0 = scores[0, order]
    k0 = int((exit_at == 0).sum())
    gain = torch.cumsum(correct[0, order].long() - correct[2, order].long(), 0)  # after k
    for k in range(k0 + 1, n + 1):
        if k == n or s0[k - 1] > s0[k]:
            assert int(correct[2].sum()) + int(gain[k - 1]) < needed


def test_exit_loss_is_the_weighted_sum_with_optional_distillation():
    torch.manual_seed(0)
    z1, z2, final = torch.randn(3, 6, 4).unbind(0)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    task = F.cross_entropy(final, y)
    plain = exit_loss(task, [z1, z2], final, y, [0.5, 0.3, 1.0])
    expected = 1.0 * task + 0.5 * F.cross_entropy(z1, y) + 0.3 * F.cross_entropy(z2, y)
    assert plain.item() == pytest.approx(expected.item(), rel=1e-6)
    t, a = 3.0, 0.4
    kd = exit_loss(task, [z1], final, y, [1.0, 2.0], distill_alpha=a, temperature=t)
    p = torch.softmax(final / t, -1)
    kl = (p * (p.log() - torch.log_softmax(z1 / t, -1))).sum(-1).mean() * t * t
    hand = 2.0 * task + (1 - a) * F.cross_entropy(z1, y) + a * kl
    assert kd.item() == pytest.approx(hand.item(), rel=1e-5)
