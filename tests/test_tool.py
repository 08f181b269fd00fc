"""The tool's batched, differentiable decode against segment-anything's own predictor."""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from grto_cli.core.answer import ToolCall
from grto_cli.core.tiny import tiny_sam_arch
from grto_cli.core.tool import SamTool, build_sam


@pytest.mark.parametrize("call", [ToolCall(box=(10.0, 5.0, 70.0, 30.0), points=((40.0, 18.0),)),
                                  ToolCall(points=((20.0, 30.0), (80.0, 10.0))),
                                  ToolCall(box=(50.0, 2.0, 95.0, 38.0))])
def test_decode_matches_sam_predictor_on_an_image_sam_resizes(call):
    """A 40x96 image: SAM (input 64) resizes it by 2/3 and pads it to a square, so prompts in
    original pixels must go through the same coordinate transform as SamPredictor's."""
    torch.manual_seed(0)
    arch = tiny_sam_arch()
    sam = build_sam(arch).eval()
    tool = SamTool(sam, arch)
    image = np.random.default_rng(0).integers(0, 255, (40, 96, 3), dtype=np.uint8)
    assert tool.input_size(image.shape[:2]) != image.shape[:2]  # really resized
    with torch.no_grad():
        ours = tool.decode(tool.embed([image]), [call], image.shape[:2])[0].numpy()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    points = np.array(call.points, dtype=np.float32) if call.points else None
    labels = np.ones(len(call.points), dtype=np.int64) if call.points else None
    box = np.array(call.box, dtype=np.float32) if call.box else None
    theirs, _, _ = predictor.predict(point_coords=points, point_labels=labels, box=box,
                                     multimask_output=False, return_logits=True)
    assert ours.shape == theirs[0].shape == image.shape[:2]
    np.testing.assert_allclose(ours, theirs[0], atol=1e-4)
