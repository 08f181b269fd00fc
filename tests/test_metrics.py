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
