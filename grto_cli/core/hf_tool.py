"""What the two Hugging Face tool kinds share: "sam-hf" (transformers' ``SamModel``) and "sam2-hf"
(``Sam2Model``). Loading a ``save_pretrained`` directory with its processor, saving one with
``tool.yaml``, the image processor's pixels, the cached embeddings and the frozen / trained split's
plumbing live here once; each kind's module keeps what differs (its classes, its default processor,
which parts run inside the cached features, how it scales coordinates and calls its mask decoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from grto_cli.core.tool import DEFAULT_ENCODE_BATCH, EmbeddingCache, embed_cached

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class HfTool:
    """A tool from a transformers model + processor. A kind sets the class attributes and defines
    ``default_processor``, ``frozen_parts``, ``encode_trainable`` and ``decode``."""

    kind: str  # the kind tool.yaml names
    label: str  # the model's name in messages ("SAM", "SAM2")
    classes: tuple[str, str, str]  # transformers' (model, processor, image processor) classes
    min_transformers: str  # the first transformers version with them

    def __init__(self, model, processor, cache: EmbeddingCache | None = None,
                 encode_batch: int = DEFAULT_ENCODE_BATCH):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be at least 1, got {encode_batch}")
        self.model = model
        self.processor = processor
        self.embedding_cache = cache if cache is not None else EmbeddingCache()
        self.encode_batch = encode_batch

    # -- the kind's transformers classes, and loading ---------------------------------------------

    @classmethod
    def transformers_classes(cls) -> tuple:
        """(model, processor, image processor) classes, or an ImportError that names the version needed."""
        try:
            import transformers

            return tuple(getattr(transformers, name) for name in cls.classes)
        except (ImportError, AttributeError) as exc:  # transformers older than the model's port
            raise ImportError(f"the {cls.kind} tool needs transformers with {cls.classes[0]} (transformers >= "
                              f"{cls.min_transformers}); this one has none: {exc}") from None

    @classmethod
    def default_processor(cls, model):
        """The processor the model's checkpoint would come with, at its image size."""
        raise NotImplementedError

    @classmethod
    def processor_for(cls, model, directory: str | Path | None = None):
        """The directory's saved processor, else the default one at the model's image size."""
        if directory is not None and any((Path(directory) / f).is_file() for f in PROCESSOR_FILES):
            return cls.transformers_classes()[1].from_pretrained(str(directory))
        return cls.default_processor(model)

    @classmethod
    def _pretrained(cls, directory: str | Path):
        return cls.transformers_classes()[0].from_pretrained(str(directory), dtype=torch.float32)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", cache: EmbeddingCache | None = None,
             encode_batch: int = DEFAULT_ENCODE_BATCH) -> "HfTool":
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"Hugging Face {cls.label} directory not found: {directory}/config.json is "
                                    f"missing (expected a {cls.classes[0]} save_pretrained directory)")
        model = cls._pretrained(directory)
        return cls(model.to(device).eval(), cls.processor_for(model, directory), cache, encode_batch)

    def save(self, directory: str | Path) -> Path:
        """The model + processor (``save_pretrained``) and ``tool.yaml`` (the kind)."""
        from grto_cli.core.tool_kinds import write_kind

        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        self.processor.save_pretrained(str(directory))
        write_kind(directory, self.kind)
        return directory

    def load_weights(self, directory: str | Path) -> None:
        from grto_cli.core.tool_kinds import check_kind

        check_kind(directory, self.kind)
        self.model.load_state_dict(self._pretrained(directory).state_dict())

    # -- what trains -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def frozen_parts(self) -> list[torch.nn.Module]:
        """The modules that run once per image, inside the cached features: never trained by GRTO."""
        raise NotImplementedError

    def freeze_image_encoder(self) -> None:
        for part in self.frozen_parts():
            part.requires_grad_(False)
            part.eval()

    def freeze(self) -> None:
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "HfTool":
        self.model.prompt_encoder.train(mode)
        self.model.mask_decoder.train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    # -- images ----------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Pixel values (b, 3, S, S) exactly as the processor makes them."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None):
        """Frozen image features on the tool's device (``tool.embed_cached``: cached, encoded under
        bf16 autocast on CUDA), as the kind's ``encode_trainable`` makes them."""
        return embed_cached(images, keys, self.embedding_cache, self.encode_batch, self.device,
                            self.encode_trainable)

    def encode_trainable(self, images: Sequence[np.ndarray]):
        raise NotImplementedError
