"""Rewards of one query's rollouts against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from grto_cli.core.answer import ParsedAnswer, ToolCall
from grto_cli.core.metrics import box_iou, points_inside
from grto_cli.core.rewards import RewardWeights, compute_rewards, mask_iou

H = W = 10
TARGET_BOX = [2.0, 2.0, 6.0, 6.0]  # pixel-edge: rows/cols 2..5, 16 pixels


def _target() -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[2:6, 2:6] = True
    return m


def _ok(box=None, points=()) -> ParsedAnswer:
    return ParsedAnswer(ToolCall(box=box, points=tuple(points)), "ok")


def test_parse_failure_gets_penalty_only():
    parsed = [ParsedAnswer(None, "bad json"), ParsedAnswer(None, "no answer tag")]
    # Even a mask that covers the target must not earn IoU for an unparsable answer.
    preds = torch.stack([_target(), torch.ones(H, W, dtype=torch.bool)])
    out = compute_rewards(parsed, preds, _target(), TARGET_BOX, RewardWeights(box_iou=1.0, point=1.0))
    assert out.total.tolist() == [-0.5, -0.5]
    assert out.iou.tolist() == [0.0, 0.0] and out.box_iou.tolist() == [0.0, 0.0] and out.point.tolist() == [0.0, 0.0]
    assert out.format_ok.tolist() == [False, False]
    assert out.total.dtype == torch.float32


def test_perfect_answer_gets_format_plus_iou():
    parsed = [_ok(box=tuple(TARGET_BOX), points=[(3.5, 3.5)])]
    out = compute_rewards(parsed, _target()[None], _target(), TARGET_BOX, RewardWeights())
    assert out.total.tolist() == pytest.approx([0.5 + 1.0])
    assert out.iou.tolist() == [1.0] and out.format_ok.tolist() == [True]
    # The optional terms are still measured (for logging) with weight 0.
    assert out.box_iou.tolist() == [1.0] and out.point.tolist() == [1.0]


def test_box_and_point_terms_hand_case():
    pred = torch.zeros(H, W, dtype=torch.bool)
    pred[2:6, 2:4] = True  # half of the target: IoU 8 / 16
    # Box [4, 4, 8, 8] vs [2, 2, 6, 6]: intersection 2 x 2 = 4, union 16 + 16 - 4 = 28.
    # Points: (3, 3) inside; (5.99, 2.0) -> pixel (row 2, col 5) inside; (6.0, 3.0) -> col 6, outside
    # (pixel-edge 6 is the target's right edge); (10.0, 10.0) clamps to (9, 9), outside. 2 of 4.
    parsed = [_ok(box=(4.0, 4.0, 8.0, 8.0), points=[(3, 3), (5.99, 2.0), (6.0, 3.0), (10.0, 10.0)]),
              ParsedAnswer(None, "bad json")]
    preds = torch.stack([pred, torch.zeros(H, W, dtype=torch.bool)])
    weights = RewardWeights(format=0.5, format_penalty=1.0, iou=1.0, box_iou=0.5, point=0.25)
    out = compute_rewards(parsed, preds, _target(), TARGET_BOX, weights)
    assert out.iou.tolist() == pytest.approx([0.5, 0.0])
    assert out.box_iou.tolist() == pytest.approx([4 / 28, 0.0])
    assert out.point.tolist() == pytest.approx([0.5, 0.0])
    assert out.total.tolist() == pytest.approx([0.5 + 0.5 + 0.5 * 4 / 28 + 0.25 * 0.5, -1.0])


def test_points_only_and_box_only_calls():
    parsed = [_ok(points=[(2.0, 2.0)]), _ok(box=(2.0, 2.0, 4.0, 6.0))]
    preds = torch.stack([_target(), _target()])
    out = compute_rewards(parsed, preds, _target(), TARGET_BOX, RewardWeights(box_iou=1.0, point=1.0))
    assert out.box_iou.tolist() == pytest.approx([0.0, 0.5])  # no box -> 0; 8 / 16
    assert out.point.tolist() == pytest.approx([1.0, 0.0])  # no points -> 0
    assert out.total.tolist() == pytest.approx([2.5, 2.0])


def test_box_iou_cases():
    assert box_iou([0, 0, 4, 4], [0, 0, 4, 4]) == 1.0
    assert box_iou([0, 0, 4, 4], [2, 0, 6, 4]) == pytest.approx(8 / 24)
    assert box_iou([0, 0, 2, 2], [2, 2, 4, 4]) == 0.0  # touching corners share no area
    assert box_iou([0, 0, 2, 2], [5, 5, 9, 9]) == 0.0
    assert box_iou([0, 0, float("nan"), 2], [0, 0, 2, 2]) == 0.0


def test_points_inside_empty():
    assert points_inside((), _target()) == 0.0


def test_mask_iou_cases():
    empty = torch.zeros(2, H, W, dtype=torch.bool)
    assert mask_iou(empty, torch.zeros(H, W, dtype=torch.bool)).tolist() == [1.0, 1.0]  # empty union
    assert mask_iou(empty, _target()).tolist() == [0.0, 0.0]
    pred = torch.zeros(2, H, W, dtype=torch.bool)
    pred[0, 2:6, 2:6] = True
    pred[1, 0:4, 0:4] = True  # overlap rows/cols 2..3: 4 px; union 16 + 16 - 4 = 28
    assert mask_iou(pred, _target()).tolist() == pytest.approx([1.0, 4 / 28])
    assert mask_iou(pred, _target().expand(2, H, W)).tolist() == pytest.approx([1.0, 4 / 28])


def test_mask_iou_rejects_logits():
    with pytest.raises(TypeError):
        mask_iou(torch.randn(1, H, W), _target())


def test_rewards_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        compute_rewards([_ok(points=[(1, 1)])], torch.zeros(2, H, W, dtype=torch.bool), _target(), TARGET_BOX,
                        RewardWeights())
