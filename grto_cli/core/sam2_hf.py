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

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grto_cli.core.answer import ToolCall
from grto_cli.core.tool import (DEFAULT_ENCODE_BATCH, EmbeddingCache, FeatureLevels, decode_grouped, embed_cached)

# The mask decoder's parts that act on the image features inside get_image_embeddings (cached, frozen).
FEATURE_CONVS = ("conv_s0", "conv_s1")


def _transformers_sam2():
    try:
        from transformers import Sam2ImageProcessor, Sam2Model, Sam2Processor
    except ImportError as exc:  # transformers older than SAM2's port
        raise ImportError("the sam2-hf tool needs transformers with Sam2Model (transformers >= 4.56); "
                          f"this one has none: {exc}") from None
    return Sam2Model, Sam2Processor, Sam2ImageProcessor


def processor_for(model, directory: str | Path | None = None):
    """The directory's saved ``Sam2Processor``, else the default one at the model's image size."""
    Sam2Model, Sam2Processor, Sam2ImageProcessor = _transformers_sam2()
    if directory is not None and any((Path(directory) / f).is_file()
                                     for f in ("processor_config.json", "preprocessor_config.json")):
        return Sam2Processor.from_pretrained(str(directory))
    size = model.config.prompt_encoder_config.image_size
    return Sam2Processor(Sam2ImageProcessor(size={"height": size, "width": size}))


def load_sam2_hf(directory: str | Path, device: str | torch.device = "cpu", cache: EmbeddingCache | None = None,
                 encode_batch: int = DEFAULT_ENCODE_BATCH) -> "Sam2HfTool":
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"Hugging Face SAM2 directory not found: {directory}/config.json is missing "
                                f"(expected a Sam2Model save_pretrained directory)")
    Sam2Model, _, _ = _transformers_sam2()
    model = Sam2Model.from_pretrained(str(directory), dtype=torch.float32)
    return Sam2HfTool(model.to(device).eval(), processor_for(model, directory), cache, encode_batch)


class Sam2HfTool:
    """Kind "sam2-hf": batched, differentiable decoding of parsed tool calls with a transformers Sam2Model."""

    kind = "sam2-hf"

    def __init__(self, model, processor, cache: EmbeddingCache | None = None,
                 encode_batch: int = DEFAULT_ENCODE_BATCH):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be at least 1, got {encode_batch}")
        self.model = model
        self.processor = processor
        self.embedding_cache = cache if cache is not None else EmbeddingCache()
        self.encode_batch = encode_batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def _feature_parts(self) -> list[torch.nn.Module]:
        decoder = self.model.mask_decoder
        return [self.model.vision_encoder, *(getattr(decoder, name) for name in FEATURE_CONVS)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        decoder = self.model.mask_decoder.named_parameters()
        return list(self.model.prompt_encoder.parameters()) + [p for name, p in decoder
                                                                if name.split(".")[0] not in FEATURE_CONVS]

    def freeze_image_encoder(self) -> None:
        for part in self._feature_parts():
            part.requires_grad_(False)
            part.eval()
        self.model.no_memory_embedding.requires_grad_(False)

    def freeze(self) -> None:
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "Sam2HfTool":
        self.model.prompt_encoder.train(mode)
        self.model.mask_decoder.train(mode)
        for part in self._feature_parts():
            part.eval()
        return self

    def save(self, directory: str | Path) -> Path:
        """The model + processor (``save_pretrained``) and ``tool.yaml`` (kind: sam2-hf)."""
        from grto_cli.core.tool_kinds import write_kind

        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        self.processor.save_pretrained(str(directory))
        write_kind(directory, self.kind)
        return directory

    def load_weights(self, directory: str | Path) -> None:
        from grto_cli.core.tool_kinds import check_kind

        check_kind(directory, self.kind)
        Sam2Model, _, _ = _transformers_sam2()
        saved = Sam2Model.from_pretrained(str(directory), dtype=torch.float32)
        self.model.load_state_dict(saved.state_dict())

    # -- images ----------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Pixel values (b, 3, S, S) exactly as the processor makes them."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None) -> FeatureLevels:
        """Frozen image features (``FeatureLevels``: (B, C0, 4h, 4w), (B, C1, 2h, 2w), (B, C, h, w)) on
        the tool's device (``tool.embed_cached``), encoded under bf16 autocast on CUDA."""
        return embed_cached(images, keys, self.embedding_cache, self.encode_batch, self.device,
                            self.encode_trainable)

    def encode_trainable(self, images: Sequence[np.ndarray]) -> FeatureLevels:
        """``Sam2Model.get_image_embeddings`` without its no_grad (pretraining a tiny SAM2 from scratch)."""
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
