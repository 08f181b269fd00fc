"""Tool kind "sam2-hf": SAM2 / SAM2.1 in Hugging Face format, through transformers' ``Sam2Model``.

The same numbers as transformers' own pipeline (``Sam2Processor`` + ``Sam2Model`` +
``post_process_masks``), kept differentiable:

- images: the directory's own ``Sam2ImageProcessor`` (resize to its square size, rescale, normalise);
- embed: ``Sam2Model.get_image_embeddings``: the two high-resolution feature maps (already through the
  mask decoder's ``conv_s0``/``conv_s1``, as SAM2's predictor caches them) + the image embedding
  (with the no-memory embedding added). All three levels are cached and counted (``FeatureLevels``);
- prompts: box + points in original-image pixels, scaled to the processor's ``target_size`` as
  ``Sam2Processor._normalize_coordinates`` does (x by target/W, y by target/H: SAM2 squashes the image
  to a square), labels 1; multimask off (the decoder's single-mask output, with SAM2's dynamic
  stability fallback in eval mode, as the predictor);
- logits: the low-res masks bilinearly resized to the original size (``post_process_masks`` without
  binarising).

What GRTO trains: the prompt encoder and the mask decoder, except ``conv_s0``/``conv_s1``, which run
once per image inside the cached features and stay frozen with the image encoder.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grto_cli.core.answer import ToolCall
from grto_cli.core.hf_tool import HfTool
from grto_cli.core.tool import DEFAULT_ENCODE_BATCH, EmbeddingCache, FeatureLevels, decode_grouped

# The mask decoder's parts that act on the image features inside get_image_embeddings (cached, frozen).
FEATURE_CONVS = ("conv_s0", "conv_s1")


class Sam2HfTool(HfTool):
    """Kind "sam2-hf": batched, differentiable decoding of parsed tool calls with a transformers Sam2Model."""

    kind = "sam2-hf"
    label = "SAM2"
    classes = ("Sam2Model", "Sam2Processor", "Sam2ImageProcessor")
    min_transformers = "4.56"

    @classmethod
    def default_processor(cls, model):
        _, Sam2Processor, Sam2ImageProcessor = cls.transformers_classes()
        size = model.config.prompt_encoder_config.image_size
        return Sam2Processor(Sam2ImageProcessor(size={"height": size, "width": size}))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        decoder = self.model.mask_decoder.named_parameters()
        return list(self.model.prompt_encoder.parameters()) + [p for name, p in decoder
                                                                if name.split(".")[0] not in FEATURE_CONVS]

    def frozen_parts(self) -> list[torch.nn.Module]:
        decoder = self.model.mask_decoder
        return [self.model.vision_encoder, *(getattr(decoder, name) for name in FEATURE_CONVS)]

    def freeze_image_encoder(self) -> None:
        super().freeze_image_encoder()
        self.model.no_memory_embedding.requires_grad_(False)  # added to the cached image embedding

    def encode_trainable(self, images: Sequence[np.ndarray]) -> FeatureLevels:
        """``Sam2Model.get_image_embeddings`` without its no_grad (pretraining a tiny SAM2 from scratch):
        ``FeatureLevels`` (B, C0, 4h, 4w), (B, C1, 2h, 2w), (B, C, h, w)."""
        pixels = self.preprocess(images)  # (b, 3, S, S)
        features = self.model.get_image_features(pixels, return_dict=True).fpn_hidden_states  # each (hw, b, C_l)
        features[-1] = features[-1] + self.model.no_memory_embedding
        return FeatureLevels(tuple(f.permute(1, 2, 0).view(len(images), -1, *size)
                                   for f, size in zip(features, self.model.backbone_feature_sizes)))

    # -- calls -----------------------------------------------------------------------------------

    def _scale(self, xy: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Sam2Processor._normalize_coordinates: pixels (..., 2) of the original image -> the model's square."""
        old_h, old_w = original_size
        target = self.processor.target_size
        xy = xy.clone()
        xy[..., 0] = xy[..., 0] * (target / old_w)
        xy[..., 1] = xy[..., 1] * (target / old_h)
        return xy

    def decode(self, embedding: FeatureLevels, calls: Sequence[ToolCall | None],
               original_size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (N, H, W) at the original image size for N calls on one image (``decode_grouped``)."""
        def group(calls: list[ToolCall], has_box: bool, n_points: int) -> torch.Tensor:
            return self._decode_group(embedding, calls, has_box, n_points, original_size)

        return decode_grouped(calls, original_size, embedding.device, group)

    def _decode_group(self, embedding: FeatureLevels, calls: list[ToolCall], has_box: bool, n_points: int,
                      original_size: tuple[int, int]) -> torch.Tensor:
        n = len(calls)
        points = labels = boxes = None
        if n_points:
            coords = torch.tensor([[list(p) for p in c.points] for c in calls], dtype=torch.float32)  # (n, P, 2)
            points = self._scale(coords, original_size)[None].to(self.device)  # (1, n, P, 2)
            labels = torch.ones((1, n, n_points), dtype=torch.int64, device=self.device)
        if has_box:
            corners = torch.tensor([c.box for c in calls], dtype=torch.float32).reshape(-1, 2, 2)  # (n, 2, 2)
            boxes = self._scale(corners, original_size).reshape(1, n, 4).to(self.device)  # (1, n, 4)
        sparse, dense = self.model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=boxes,
                                                  input_masks=None)
        levels = embedding.levels
        low_res, _, _, _ = self.model.mask_decoder(
            image_embeddings=levels[-1], image_positional_embeddings=self.model.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            high_resolution_features=list(levels[:-1]))  # (1, n, 1, h, w)
        return F.interpolate(low_res[0], original_size, mode="bilinear", align_corners=False)[:, 0]  # (n, H, W)


def load_sam2_hf(directory, device: str | torch.device = "cpu", cache: EmbeddingCache | None = None,
                 encode_batch: int = DEFAULT_ENCODE_BATCH) -> Sam2HfTool:
    return Sam2HfTool.load(directory, device, cache, encode_batch)
