"""Tool kind "sam2": SAM2 / SAM2.1 from Meta's official ``.pt`` files, through Meta's ``sam2`` package
(the optional extra ``grto[sam2]``).

The same numbers as ``sam2.sam2_image_predictor.SAM2ImagePredictor`` (``set_image`` then
``predict(..., multimask_output=False, return_logits=True)``), kept differentiable:

- images: the package's ``SAM2Transforms`` (squash to the model's square ``image_size``, normalise);
- embed: ``SAM2Base.forward_image`` + ``_prepare_backbone_features``: the two high-resolution maps
  (already through the mask decoder's ``conv_s0``/``conv_s1``, as the predictor caches them) and the
  image embedding with ``no_mem_embed`` added. All three levels are cached and counted
  (``FeatureLevels``);
- prompts: box + points in original-image pixels, normalised by (W, H) and scaled to ``image_size``
  (``SAM2Transforms.transform_coords``); the box becomes two corner points (labels 2, 3) placed
  before the call's points (labels 1), one prompt-encoder call, as ``SAM2ImagePredictor._predict``;
- decode: multimask off, with SAM2's dynamic stability fallback in eval mode (``build_sam2``'s
  post-processing settings); logits resized to the original size by ``SAM2Transforms.postprocess_masks``
  (no hole filling: the predictor's default).

What a tool path holds:

    a directory   ``sam2.pt`` (Meta's format: ``{"model": state_dict}``, loadable by ``build_sam2``)
                  + ``sam2.yaml`` (the resolved model config, ``_target_``s inside the ``sam2`` package
                  only) + ``tool.yaml`` (kind: sam2)
    a bare file   Meta's ``sam2_hiera_large.pt`` / ``sam2.1_hiera_large.pt`` ... with a tool arch
                  naming its config (``SAM2_ARCHS``: ``sam2.1_hiera_l``, ``sam2_hiera_b+`` ...)

What GRTO trains: the prompt encoder and the mask decoder, except ``conv_s0``/``conv_s1``, which run
once per image inside the cached features and stay frozen with the image encoder. The video-only
parts of ``SAM2Base`` (memory attention, memory encoder, object pointers) are loaded, saved and frozen.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from grto_cli.core.answer import ToolCall
from grto_cli.core.io import atomic_path, write_text
from grto_cli.core.tool import DEFAULT_ENCODE_BATCH, EmbeddingCache, FeatureLevels, decode_grouped, embed_cached

SAM2_KIND = "sam2"
SAM2_WEIGHTS = "sam2.pt"
SAM2_CONFIG = "sam2.yaml"
# tool arch -> its config inside the sam2 package (Meta's official checkpoints: sam2_hiera_large.pt
# goes with sam2_hiera_l, sam2.1_hiera_large.pt with sam2.1_hiera_l, and so on)
SAM2_ARCHS = {f"{version}_hiera_{size}": f"configs/{version}/{version}_hiera_{size}.yaml"
              for version in ("sam2", "sam2.1") for size in ("t", "s", "b+", "l")}
# What sam2.build_sam.build_sam2(apply_postprocessing=True) overrides, and so what its image
# predictor decodes with (tests/test_sam2_meta.py compares the built decoders).
POSTPROCESSING = ("++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
                  "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
                  "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98")
# The mask decoder's parts that act on the image features inside forward_image (cached, frozen).
FEATURE_CONVS = ("conv_s0", "conv_s1")
INSTALL_HINT = ("pip install 'grto[sam2]' (Meta's sam2 package; on a machine without nvcc: "
                "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'grto[sam2]')")


def _sam2():
    try:
        import sam2  # noqa: F401 - initialises hydra's config module for the package's configs
    except ImportError as exc:
        raise ImportError(f"the sam2 tool kind needs Meta's sam2 package, which is not installed: {INSTALL_HINT} "
                          f"({exc})") from None
    return sam2


def preset_config(arch: str) -> dict:
    """The resolved model config of a preset (``SAM2_ARCHS``), as ``build_sam2`` composes it."""
    if arch not in SAM2_ARCHS:
        raise ValueError(f"unknown SAM2 tool arch {arch!r}; expected one of {sorted(SAM2_ARCHS)}")
    _sam2()
    from hydra import compose
    from omegaconf import OmegaConf

    cfg = compose(config_name=SAM2_ARCHS[arch], overrides=list(POSTPROCESSING))
    return {"model": OmegaConf.to_container(cfg.model, resolve=True)}


def _check_targets(node, where: str) -> None:
    """Every ``_target_`` names something inside the sam2 package: a config file is not code."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith("sam2."):
            raise ValueError(f"{where}: _target_ {target!r} is outside the sam2 package; grto builds only "
                             f"sam2.* classes from a tool config")
        for value in node.values():
            _check_targets(value, where)
    elif isinstance(node, list):
        for value in node:
            _check_targets(value, where)


def build_sam2_model(config: dict, where: str = "tool config") -> torch.nn.Module:
    """An untrained ``SAM2Base`` from a model config (``{"model": {...}}``), by the package's own
    hydra instantiation, as ``build_sam2`` does."""
    _sam2()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{where}: expected a SAM2 config with a 'model' section (as in the sam2 package's "
                         f"configs), got {type(config).__name__}")
    _check_targets(config, where)
    return instantiate(OmegaConf.create(config).model, _recursive_=True)


def _load_state(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not a SAM2 checkpoint in Meta's format (expected a dict with a 'model' "
                         f"state dict, as sam2_hiera_large.pt / sam2.1_hiera_large.pt)")
    return checkpoint["model"]


def load_sam2(path: str | Path, arch: str | dict | None = None, device: str | torch.device = "cpu",
              cache: EmbeddingCache | None = None, encode_batch: int = DEFAULT_ENCODE_BATCH) -> "Sam2Tool":
    """A SAM2 tool from a grto directory (``sam2.pt`` + ``sam2.yaml``) or Meta's bare ``.pt`` with
    ``arch`` (a ``SAM2_ARCHS`` name, or a model config dict)."""
    path = Path(path)
    where = "the tool arch"
    if path.is_dir():
        config_file = path / SAM2_CONFIG
        if arch is None and config_file.is_file():
            arch, where = yaml.safe_load(config_file.read_text()), str(config_file)
        path = path / SAM2_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"SAM2 checkpoint not found: {path} (expected Meta's sam2_hiera_*.pt / "
                                f"sam2.1_hiera_*.pt with a tool arch such as sam2.1_hiera_l, or a directory with "
                                f"{SAM2_WEIGHTS} + {SAM2_CONFIG})")
    if arch is None:
        raise ValueError(f"SAM2 architecture unknown for {path}: set the tool arch to one of {sorted(SAM2_ARCHS)}")
    config = preset_config(arch) if isinstance(arch, str) else arch
    model = build_sam2_model(config, where)
    try:
        model.load_state_dict(_load_state(path))
    except RuntimeError as exc:  # missing, unexpected or misshapen weights
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ValueError(f"{path}: its weights do not fit the SAM2 arch "
                         f"{arch if isinstance(arch, str) else '(a model config)'}: {detail} ...; check the tool arch") from None
    return Sam2Tool(model.to(device).eval(), config, cache, encode_batch)


class Sam2Tool:
    """Kind "sam2": batched, differentiable decoding of parsed tool calls with Meta's ``SAM2Base``."""

    kind = SAM2_KIND

    def __init__(self, model: torch.nn.Module, config: dict, cache: EmbeddingCache | None = None,
                 encode_batch: int = DEFAULT_ENCODE_BATCH):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be at least 1, got {encode_batch}")
        from sam2.utils.transforms import SAM2Transforms

        self.model = model
        self.config = config
        self.transforms = SAM2Transforms(resolution=model.image_size, mask_threshold=0.0)
        self.embedding_cache = cache if cache is not None else EmbeddingCache()
        self.encode_batch = encode_batch

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        decoder = self.model.sam_mask_decoder.named_parameters()
        return list(self.model.sam_prompt_encoder.parameters()) + [p for name, p in decoder
                                                                    if name.split(".")[0] not in FEATURE_CONVS]

    def freeze_image_encoder(self) -> None:
        """Everything but the prompt encoder and mask decoder: the image encoder, the convs inside the
        cached features, ``no_mem_embed`` and the video-only parts."""
        trainable = {id(p) for p in self.trainable_parameters()}
        for p in self.model.parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
        self.model.image_encoder.eval()

    def freeze(self) -> None:
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> "Sam2Tool":
        self.model.eval()
        self.model.sam_prompt_encoder.train(mode)
        self.model.sam_mask_decoder.train(mode)
        return self

    def save(self, directory: str | Path) -> Path:
        """``sam2.pt`` in Meta's format, ``sam2.yaml`` (the model config) and ``tool.yaml`` (kind: sam2)."""
        from grto_cli.core.tool_kinds import write_kind

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # through a buffer: the zip's record names would carry the temp file's name
        torch.save({"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}, buffer)
        with atomic_path(directory / SAM2_WEIGHTS) as tmp:
            tmp.write_bytes(buffer.getvalue())
        write_text(directory / SAM2_CONFIG, yaml.safe_dump(self.config, sort_keys=True))
        write_kind(directory, self.kind)
        return directory / SAM2_WEIGHTS

    def load_weights(self, directory: str | Path) -> None:
        from grto_cli.core.tool_kinds import check_kind

        check_kind(directory, self.kind)
        self.model.load_state_dict(_load_state(Path(directory) / SAM2_WEIGHTS))

    # -- images ----------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(b, 3, S, S) exactly as ``SAM2ImagePredictor.set_image`` makes them."""
        return self.transforms.forward_batch(list(images)).to(self.device)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None) -> FeatureLevels:
        """Frozen image features (``FeatureLevels``: (B, C0, 4h, 4w), (B, C1, 2h, 2w), (B, C, h, w)) on
        the tool's device (``tool.embed_cached``), encoded under bf16 autocast on CUDA."""
        return embed_cached(images, keys, self.embedding_cache, self.encode_batch, self.device,
                            self.encode_trainable)

    def encode_trainable(self, images: Sequence[np.ndarray]) -> FeatureLevels:
        """``set_image``'s features without its no_grad (pretraining a tiny SAM2 from scratch)."""
        backbone = self.model.forward_image(self.preprocess(images))
        _, features, _, sizes = self.model._prepare_backbone_features(backbone)  # each (hw, b, C_l)
        if self.model.directly_add_no_mem_embed:
            features[-1] = features[-1] + self.model.no_mem_embed
        return FeatureLevels(tuple(f.permute(1, 2, 0).view(len(images), -1, *size)
                                   for f, size in zip(features, sizes)))

    # -- calls -----------------------------------------------------------------------------------

    def decode(self, embedding: FeatureLevels, calls: Sequence[ToolCall | None],
               original_size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (N, H, W) at the original image size for N calls on one image (``decode_grouped``)."""
        def group(calls: list[ToolCall], has_box: bool, n_points: int) -> torch.Tensor:
            return self._decode_group(embedding, calls, has_box, n_points, original_size)

        return decode_grouped(calls, original_size, embedding.device, group)

    def _decode_group(self, embedding: FeatureLevels, calls: list[ToolCall], has_box: bool, n_points: int,
                      original_size: tuple[int, int]) -> torch.Tensor:
        n = len(calls)
        coords, labels = [], []
        if has_box:  # the box first, as two corner points labelled 2 and 3
            boxes = torch.tensor([c.box for c in calls], dtype=torch.float32, device=self.device)  # (n, 4)
            coords.append(self.transforms.transform_boxes(boxes, normalize=True, orig_hw=original_size))  # (n, 2, 2)
            labels.append(torch.tensor([[2, 3]], dtype=torch.int, device=self.device).repeat(n, 1))
        if n_points:
            points = torch.tensor([[list(p) for p in c.points] for c in calls], dtype=torch.float32,
                                  device=self.device)  # (n, P, 2)
            coords.append(self.transforms.transform_coords(points, normalize=True, orig_hw=original_size))
            labels.append(torch.ones((n, n_points), dtype=torch.int, device=self.device))
        sparse, dense = self.model.sam_prompt_encoder(points=(torch.cat(coords, 1), torch.cat(labels, 1)),
                                                      boxes=None, masks=None)
        levels = embedding.levels
        low_res, _, _, _ = self.model.sam_mask_decoder(
            image_embeddings=levels[-1], image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=n > 1, high_res_features=list(levels[:-1]))  # (n, 1, h, w)
        return self.transforms.postprocess_masks(low_res, original_size)[:, 0]  # (n, H, W)
