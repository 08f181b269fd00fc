"""grto: reasoning/referring segmentation trained with GRPO, GRTO and B-GRTO."""

__version__ = "0.1.0"
