"""Camouflaged-object-detection metrics, computed with PySODMetrics (``py_sod_metrics``).

That library is the field's reference implementation (a port of the MATLAB evaluation toolbox
the COD papers report), so we call it rather than re-deriving S-measure, weighted F-measure and
E-measure: numbers stay comparable with published COD10K / NC4K tables. Values are fractions in
[0, 1] as papers print them (e.g. S-measure 0.907), not percentages.
"""

from __future__ import annotations

import numpy as np
import py_sod_metrics as sod


class CamouflageMeter:
    """Accumulates (prediction map, ground truth) pairs; ``summary()`` gives the dataset means."""

    def __init__(self) -> None:
        self._sm = sod.Smeasure()
        self._wfm = sod.WeightedFmeasure()
        self._em = sod.Emeasure()
        self._mae = sod.MAE()
        self.n = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """``pred``: HxW uint8 probability map in 0..255; ``gt``: HxW bool mask of the same shape."""
        if pred.ndim != 2 or pred.shape != gt.shape:
            raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be the same 2-D shape")
        if pred.dtype != np.uint8:
            raise TypeError(f"pred must be uint8 in 0..255, got {pred.dtype}")
        if gt.dtype != bool:
            raise TypeError(f"gt must be bool, got {gt.dtype}")
        # PySODMetrics takes ground truth as a 0..255 image (thresholded at 128), as read from PNG.
        gt_image = gt.astype(np.uint8) * 255
        for metric in (self._sm, self._wfm, self._em, self._mae):
            metric.step(pred=pred, gt=gt_image)
        self.n += 1

    def summary(self) -> dict:
        if self.n == 0:
            return {"n": 0, "smeasure": 0.0, "wfmeasure": 0.0, "mean_emeasure": 0.0, "mae": 0.0}
        return {
            "n": self.n,
            "smeasure": float(self._sm.get_results()["sm"]),
            "wfmeasure": float(self._wfm.get_results()["wfm"]),
            # "mean E-measure" in COD tables: the E-measure curve over 256 thresholds, averaged.
            "mean_emeasure": float(self._em.get_results()["em"]["curve"].mean()),
            "mae": float(self._mae.get_results()["mae"]),
        }
