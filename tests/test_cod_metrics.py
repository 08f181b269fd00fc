"""CamouflageMeter: agrees with PySODMetrics used directly, plus hand-checked values."""

from __future__ import annotations

import numpy as np
import py_sod_metrics as sod
import pytest

from grto_cli.core.cod_metrics import CamouflageMeter


def _pairs(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(20, 48, size=2)
        gt = np.zeros((h, w), dtype=bool)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        gt[y0:y0 + h // 3, x0:x0 + w // 3] = True
        noise = rng.integers(0, 256, size=(h, w))
        pred = np.clip(0.6 * gt * 255 + 0.4 * noise, 0, 255).astype(np.uint8)
        out.append((pred, gt))
    return out


def test_agrees_with_pysodmetrics_directly() -> None:
    pairs = _pairs(6)
    meter = CamouflageMeter()
    ref = {"sm": sod.Smeasure(), "wfm": sod.WeightedFmeasure(), "em": sod.Emeasure(), "mae": sod.MAE()}
    for pred, gt in pairs:
        meter.add(pred, gt)
        gt_png = gt.astype(np.uint8) * 255  # how the library is used on ground-truth PNGs
        for m in ref.values():
            m.step(pred=pred, gt=gt_png)
    s = meter.summary()
    assert s["n"] == 6
    assert s["smeasure"] == pytest.approx(ref["sm"].get_results()["sm"], abs=1e-12)
    assert s["wfmeasure"] == pytest.approx(ref["wfm"].get_results()["wfm"], abs=1e-12)
    assert s["mean_emeasure"] == pytest.approx(ref["em"].get_results()["em"]["curve"].mean(), abs=1e-12)
    assert s["mae"] == pytest.approx(ref["mae"].get_results()["mae"], abs=1e-12)
    # A noisy prediction is neither perfect nor useless.
    assert 0.3 < s["smeasure"] < 0.99 and 0.0 < s["mae"] < 0.5


def test_perfect_prediction() -> None:
    meter = CamouflageMeter()
    for pred, gt in _pairs(3, seed=1):
        meter.add(gt.astype(np.uint8) * 255, gt)
    s = meter.summary()
    assert s["smeasure"] == pytest.approx(1.0, abs=1e-9)
    assert s["mae"] == 0.0
    assert s["wfmeasure"] == pytest.approx(1.0, abs=1e-9)
    # At the curve's top threshold no pixel is foreground, so even a perfect map averages a
    # little under 1 in the reference implementation.
    assert 0.99 < s["mean_emeasure"] < 1.0


def test_mae_by_hand() -> None:
    gt = np.zeros((10, 10), dtype=bool)
    gt[:5, :5] = True  # 25 % foreground
    meter = CamouflageMeter()
    meter.add(np.zeros((10, 10), dtype=np.uint8), gt)  # predicts nothing
    assert meter.summary()["mae"] == pytest.approx(0.25)


def test_input_checks_and_empty_summary() -> None:
    meter = CamouflageMeter()
    assert meter.summary()["n"] == 0
    gt = np.zeros((4, 4), dtype=bool)
    with pytest.raises(TypeError):
        meter.add(np.zeros((4, 4), dtype=np.float32), gt)
    with pytest.raises(TypeError):
        meter.add(np.zeros((4, 4), dtype=np.uint8), gt.astype(np.uint8))
    with pytest.raises(ValueError):
        meter.add(np.zeros((4, 5), dtype=np.uint8), gt)
