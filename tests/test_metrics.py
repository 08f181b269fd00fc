import numpy as np
import pytest

from grto_cli.core.metrics import SegmentationMeter


def _mask(shape, box):
    m = np.zeros(shape, bool)
    y1, y2, x1, x2 = box
    m[y1:y2, x1:x2] = True
    return m


def test_giou_and_ciou_differ_on_small_vs_large_objects():
    meter = SegmentationMeter()
    # Sample 1: a large object (100 px) predicted perfectly -> IoU 1.
    big = _mask((20, 20), (0, 10, 0, 10))
    meter.add(big, big)
    # Sample 2: a small object (4 px) missed completely -> IoU 0, union 4 + 4.
    small = _mask((20, 20), (0, 2, 0, 2))
    wrong = _mask((20, 20), (10, 12, 10, 12))
    meter.add(wrong, small)
    s = meter.summary()
    assert s["giou"] == pytest.approx(50.0)  # mean(1, 0)
    assert s["ciou"] == pytest.approx(100.0 * 100 / 108)  # (100 + 0) / (100 + 8)
    assert s["precision@0.5"] == pytest.approx(50.0)
    assert s["n"] == 2


def test_partial_overlap_and_unparsed_answer_counts():
    meter = SegmentationMeter()
    target = _mask((10, 10), (0, 4, 0, 4))  # 16 px
    pred = _mask((10, 10), (0, 4, 2, 6))  # 16 px, overlap 8 -> IoU 8/24
    assert meter.add(pred, target) == pytest.approx(1 / 3)
    # An unparsable answer: empty prediction, still counted (IoU 0, target area in the union).
    meter.add(np.zeros((10, 10), bool), target, format_ok=False)
    s = meter.summary()
    assert s["giou"] == pytest.approx(100 * (1 / 3) / 2)
    assert s["ciou"] == pytest.approx(100 * 8 / (24 + 16))
    assert s["format_rate"] == pytest.approx(50.0)
    assert s["n_unparsed"] == 1
    assert s["precision@0.5"] == 0.0


def test_grounding_meter_exposes_a_policy_that_answers_the_same_box_for_everything():
    """Two systems with the same masks: one whose calls follow the targets, one that answers one
    box for every query while its tool paints the target anyway. gIoU cannot tell them apart;
    the policy and adherence terms do."""
    from grto_cli.core.answer import ToolCall
    from grto_cli.core.metrics import GroundingMeter

    targets = [((2, 6, 2, 6), [2.0, 2.0, 6.0, 6.0]), ((10, 16, 10, 18), [10.0, 10.0, 18.0, 16.0]),
               ((0, 4, 12, 20), [12.0, 0.0, 20.0, 4.0])]
    grounded, collapsed = GroundingMeter(), GroundingMeter()
    fixed = ToolCall(box=(0.0, 0.0, 4.0, 4.0), points=((1.0, 1.0),))
    for rows_cols, box in targets:
        target = _mask((20, 20), rows_cols)
        x1, y1, x2, y2 = box
        grounded.add(ToolCall(box=tuple(box), points=(((x1 + x2) / 2, (y1 + y2) / 2),)), target, target, box, target)
        collapsed.add(fixed, target, target, box, target)
    g, c = grounded.summary(), collapsed.summary()
    assert g["call_box_iou"] == pytest.approx(1.0) and g["point_in_target"] == 1.0
    assert g["distinct_calls"] == 3 and g["prompt_adherence"] == pytest.approx(1.0)
    assert c["distinct_calls"] == 1 and c["distinct_call_ratio"] == pytest.approx(1 / 3)
    assert c["call_box_iou"] < 0.2 and c["point_in_target"] == 0.0
    assert c["prompt_adherence"] < 0.5  # the tool painted outside the box it was given
    assert g["oracle_giou"] == c["oracle_giou"] == 100.0


def test_grounding_meter_exposes_a_policy_that_draws_loose_boxes_for_the_tool_to_fill():
    """A box over the whole image keeps every mask inside it (adherence 1) and its point on the
    target: only the box terms show that the policy has stopped localising."""
    from grto_cli.core.answer import ToolCall
    from grto_cli.core.metrics import GroundingMeter

    tight, loose = GroundingMeter(), GroundingMeter()
    for rows_cols, box in (((2, 6, 2, 6), [2.0, 2.0, 6.0, 6.0]), ((10, 16, 10, 18), [10.0, 10.0, 18.0, 16.0])):
        target = _mask((20, 20), rows_cols)
        x1, y1, x2, y2 = box
        point = (((x1 + x2) / 2, (y1 + y2) / 2),)
        tight.add(ToolCall(box=tuple(box), points=point), target, target, box)
        loose.add(ToolCall(box=(0.0, 0.0, 20.0, 20.0), points=point), target, target, box)
    t, lo = tight.summary(), loose.summary()
    assert t["prompt_adherence"] == lo["prompt_adherence"] == pytest.approx(1.0)
    assert t["point_in_target"] == lo["point_in_target"] == 1.0
    assert t["call_box_area_ratio"] == pytest.approx(1.0)
    assert lo["call_box_area_ratio"] == pytest.approx(np.median([400 / 16, 400 / 48]))
    assert lo["call_box_iou"] < 0.15


def test_unparsable_answers_count_as_zero_in_the_policy_terms():
    from grto_cli.core.metrics import GroundingMeter

    meter = GroundingMeter()
    target = _mask((8, 8), (0, 4, 0, 4))
    meter.add(None, np.zeros((8, 8), bool), target, [0.0, 0.0, 4.0, 4.0])
    s = meter.summary()
    assert s["call_box_iou"] == 0.0 and s["point_in_target"] == 0.0 and s["distinct_calls"] == 0
    assert s["prompt_adherence"] is None and s["prompt_adherence_n"] == 0 and "oracle_giou" not in s
    assert s["call_box_area_ratio"] is None


def test_empty_targets_are_scored_by_lisas_rule_and_counted():
    """An empty prediction on an empty target has IoU 1 (LISA), anything painted there IoU 0; cIoU
    adds nothing for it; the count is reported; the policy terms leave such samples out."""
    from grto_cli.core.answer import ToolCall
    from grto_cli.core.metrics import GroundingMeter

    meter, grounding = SegmentationMeter(), GroundingMeter()
    target = _mask((10, 10), (0, 4, 0, 4))
    empty = np.zeros((10, 10), bool)
    call = ToolCall(box=(0.0, 0.0, 4.0, 4.0), points=((1.0, 1.0),))
    assert meter.add(target, target) == 1.0
    assert meter.add(empty, empty) == 1.0  # nothing to find, nothing found
    assert meter.add(target, empty) == 0.0  # something painted where there is nothing
    s = meter.summary()
    assert s["n"] == 3 and s["n_empty_targets"] == 2
    assert s["giou"] == pytest.approx(100 * 2 / 3) and s["ciou"] == pytest.approx(100 * 16 / 32)
    grounding.add(call, target, target, [0.0, 0.0, 4.0, 4.0], oracle_pred=target)
    grounding.add(call, target, empty, [0.0, 0.0, 0.0, 0.0], oracle_pred=empty)
    g = grounding.summary()
    assert g["call_box_iou"] == 1.0 and g["point_in_target"] == 1.0 and g["prompt_adherence_n"] == 1
    assert g["oracle_giou"] == 100.0


def test_an_empty_target_has_no_oracle_prompt_and_stays_out_of_training(tmp_path):
    from PIL import Image

    from grto_cli.core.data.masks import encode_rle
    from grto_cli.core.data.records import EMPTY_TARGET, Record, write_manifest
    from grto_cli.core.inference import oracle_call
    from grto_cli.stages.sections import training_records

    def record(i, mask, meta):
        return Record(id=f"r{i}", image="x.png", width=10, height=10, query="q", mask=encode_rle(mask),
                      bbox=[0.0, 0.0, 4.0, 4.0] if mask.any() else [0.0] * 4, dataset="earthreason",
                      split="train", meta=meta)

    full = record(0, _mask((10, 10), (0, 4, 0, 4)), {})
    empty = record(1, np.zeros((10, 10), bool), {EMPTY_TARGET: True})
    assert oracle_call(empty) is None and oracle_call(full).box == (0.0, 0.0, 4.0, 4.0)
    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    write_manifest(tmp_path / "train.jsonl", [full, empty])
    assert [r.id for r in training_records(tmp_path / "train.jsonl")] == ["r0"]


def test_by_group_means_each_kind_apart_and_leaves_out_ungrouped_samples():
    from grto_cli.core.metrics import by_group

    out = by_group(["b", "a", None, "a"], hit=[1.0, 0.0, 1.0, 1.0], iou=[0.2, 0.4, 0.9, 0.6])
    assert list(out) == ["a", "b"]
    assert out["a"] == pytest.approx({"n": 2, "hit": 0.5, "iou": 0.5})
    assert out["b"] == pytest.approx({"n": 1, "hit": 1.0, "iou": 0.2})
    with pytest.raises(ValueError, match="hit: 1 values for 2 samples"):
        by_group(["a", "b"], hit=[1.0])
