"""Tool kind "sam-hf": the original SAM in Hugging Face format, through transformers' ``SamModel``.

The same numbers as transformers' own pipeline (``SamProcessor`` + ``SamModel`` +
``post_process_masks``), kept differentiable:

- images: the directory's own ``SamImageProcessor`` (resize the longest side to its size, rescale,
  normalise, pad bottom-right to its square ``pad_size``);
- embed: ``SamModel.get_image_embeddings``: the vision encoder's (B, C, h, w) output, cached;
- prompts: box + points in original-image pixels, scaled as ``SamProcessor._normalize_coordinates``
  does (x by new_w/W, y by new_h/H, where (new_h, new_w) is the longest-side resize before padding),
  in float64 as the processor hands them to the model, labels 1; multimask off;
- logits: ``post_process_masks`` without binarising: the low-res masks bilinearly upsampled to the
  padded size, the padding cropped off (the resized image's (new_h, new_w) corner), then resized to
  the original size.

What GRTO trains: the prompt encoder and the mask decoder. That includes the random-Fourier positional
matrix ``shared_image_embedding``: transformers ties it to ``prompt_encoder.shared_embedding`` (one
Parameter, listed among the prompt encoder's), which embeds the point and box coordinates, and the
image-wide positional encoding it makes (``get_image_wide_positional_embeddings``) goes to the mask
decoder at decode time. It is on the prompt path only, never in the vision encoder or the cached
embedding, so training it leaves every cached embedding valid. (segment-anything keeps the same matrix
as a fixed buffer; kind "sam" cannot train it.)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from grto_cli.core.answer import ToolCall
from grto_cli.core.hf_tool import HfTool
from grto_cli.core.tool import DEFAULT_ENCODE_BATCH, EmbeddingCache, decode_grouped


class SamHfTool(HfTool):
    """Kind "sam-hf": batched, differentiable decoding of parsed tool calls with a transformers SamModel."""

    kind = "sam-hf"
    label = "SAM"
    classes = ("SamModel", "SamProcessor", "SamImageProcessor")
    min_transformers = "4.29"

    @classmethod
    def default_processor(cls, model):
        _, SamProcessor, SamImageProcessor = cls.transformers_classes()
        size = model.config.prompt_encoder_config.image_size
        return SamProcessor(SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size}))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The prompt encoder's (with the tied ``shared_image_embedding``) and the mask decoder's."""
        return list(self.model.prompt_encoder.parameters()) + list(self.model.mask_decoder.parameters())

    def frozen_parts(self) -> list[torch.nn.Module]:
        return [self.model.vision_encoder]

    def encode_trainable(self, images) -> torch.Tensor:
        """``SamModel.get_image_embeddings`` without its no_grad (pretraining a tiny SAM from scratch):
        the vision encoder's (b, C, h, w) output, from pixels resized, normalised and padded."""
        return self.model.vision_encoder(self.preprocess(images)).last_hidden_state  # (b, C, h, w)

    # -- calls -----------------------------------------------------------------------------------

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(new_h, new_w): the original size with its longest side resized to the processor's, before padding."""
        return tuple(self.processor.image_processor._get_preprocess_shape(original_size, self.processor.target_size))

    def _scale(self, xy: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """SamProcessor._normalize_coordinates: pixels (..., 2) of the original image -> the resized image."""
        old_h, old_w = original_size
        new_h, new_w = self.input_size(original_size)
        xy = xy.clone()
        xy[..., 0] = xy[..., 0] * (new_w / old_w)
        xy[..., 1] = xy[..., 1] * (new_h / old_h)
        return xy

    def decode(self, embedding: torch.Tensor, calls: Sequence[ToolCall | None],
               original_size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (N, H, W) at the original image size for N calls on one image (``decode_grouped``)."""
        def group(calls: list[ToolCall], has_box: bool, n_points: int) -> torch.Tensor:
            return self._decode_group(embedding, calls, has_box, n_points, original_size)

        return decode_grouped(calls, original_size, embedding.device, group)

    def _decode_group(self, embedding: torch.Tensor, calls: list[ToolCall], has_box: bool, n_points: int,
                      original_size: tuple[int, int]) -> torch.Tensor:
        n = len(calls)
        points = labels = boxes = None
        if n_points:
            coords = torch.tensor([[list(p) for p in c.points] for c in calls], dtype=torch.float64)  # (n, P, 2)
            points = self._scale(coords, original_size)[None].to(self.device)  # (1, n, P, 2)
            labels = torch.ones((1, n, n_points), dtype=torch.int64, device=self.device)
        if has_box:
            # the processor reads boxes as float32, then scales them in float64
            corners = torch.tensor([c.box for c in calls], dtype=torch.float32).double().reshape(-1, 2, 2)  # (n, 2, 2)
            boxes = self._scale(corners, original_size).reshape(1, n, 4).to(self.device)  # (1, n, 4)
        sparse, dense = self.model.prompt_encoder(input_points=points, input_labels=labels, input_boxes=boxes,
                                                  input_masks=None)
        low_res, _ = self.model.mask_decoder(
            image_embeddings=embedding, image_positional_embeddings=self.model.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False)  # (1, n, 1, 4h, 4w)
        pad = self.processor.image_processor.pad_size
        new_h, new_w = self.input_size(original_size)
        padded = F.interpolate(low_res[0], (pad["height"], pad["width"]), mode="bilinear", align_corners=False)
        resized = padded[..., :new_h, :new_w]  # (n, 1, new_h, new_w): the padding cropped off
        return F.interpolate(resized, original_size, mode="bilinear", align_corners=False)[:, 0]  # (n, H, W)


def load_sam_hf(directory, device: str | torch.device = "cpu", cache: EmbeddingCache | None = None,
                encode_batch: int = DEFAULT_ENCODE_BATCH) -> SamHfTool:
    return SamHfTool.load(directory, device, cache, encode_batch)
