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

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grto_cli.core.answer import ToolCall
from grto_cli.core.tool import DEFAULT_ENCODE_BATCH, EmbeddingCache, decode_grouped, embed_cached


def _transformers_sam():
    try:
        from transformers import SamImageProcessor, SamModel, SamProcessor
    except ImportError as exc:  # transformers older than SAM's port
        raise ImportError("the sam-hf tool needs transformers with SamModel (transformers >= 4.29); "
                          f"this one has none: {exc}") from None
    return SamModel, SamProcessor, SamImageProcessor


def processor_for(model, directory: str | Path | None = None):
    """The directory's saved ``SamProcessor``, else the default one at the model's image size."""
    SamModel, SamProcessor, SamImageProcessor = _transformers_sam()
    if directory is not None and any((Path(directory) / f).is_file()
                                     for f in ("processor_config.json", "preprocessor_config.json")):
        return SamProcessor.from_pretrained(str(directory))
    size = model.config.prompt_encoder_config.image_size
    return SamProcessor(SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size}))


def load_sam_hf(directory: str | Path, device: str | torch.device = "cpu", cache: EmbeddingCache | None = None,
                encode_batch: int = DEFAULT_ENCODE_BATCH) -> "SamHfTool":
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"Hugging Face SAM directory not found: {directory}/config.json is missing "
                                f"(expected a SamModel save_pretrained directory)")
    SamModel, _, _ = _transformers_sam()
    model = SamModel.from_pretrained(str(directory), dtype=torch.float32)
    return SamHfTool(model.to(device).eval(), processor_for(model, directory), cache, encode_batch)


class SamHfTool:
    """Kind "sam-hf": batched, differentiable decoding of parsed tool calls with a transformers SamModel."""

    kind = "sam-hf"

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

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The prompt encoder's (with the tied ``shared_image_embedding``) and the mask decoder's."""
        return list(self.model.prompt_encoder.parameters()) + list(self.model.mask_decoder.parameters())

    def freeze_image_encoder(self) -> None:
        self.model.vision_encoder.requires_grad_(False)
        self.model.vision_encoder.eval()

    def freeze(self) -> None:
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "SamHfTool":
        self.model.prompt_encoder.train(mode)
        self.model.mask_decoder.train(mode)
        self.model.vision_encoder.eval()
        return self

    def save(self, directory: str | Path) -> Path:
        """The model + processor (``save_pretrained``) and ``tool.yaml`` (kind: sam-hf)."""
        from grto_cli.core.tool_kinds import write_kind

        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        self.processor.save_pretrained(str(directory))
        write_kind(directory, self.kind)
        return directory

    def load_weights(self, directory: str | Path) -> None:
        from grto_cli.core.tool_kinds import check_kind

        check_kind(directory, self.kind)
        SamModel, _, _ = _transformers_sam()
        saved = SamModel.from_pretrained(str(directory), dtype=torch.float32)
        self.model.load_state_dict(saved.state_dict())

    # -- images ----------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Pixel values (b, 3, S, S) exactly as the processor makes them (resized, normalised, padded)."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None) -> torch.Tensor:
        """Frozen image-encoder embeddings (B, C, h, w) on the tool's device (``tool.embed_cached``),
        encoded under bf16 autocast on CUDA."""
        return embed_cached(images, keys, self.embedding_cache, self.encode_batch, self.device,
                            self.encode_trainable)

    def encode_trainable(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``SamModel.get_image_embeddings`` without its no_grad (pretraining a tiny SAM from scratch)."""
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
