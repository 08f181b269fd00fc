"""The tool interface every stage uses (``Tool``), its embedding cache and loss, and its first kind:
SAM from ``segment-anything`` (kind "sam"), loaded from Meta's official checkpoint files.

Users (rollout, the GRTO objective, bootstrap, evaluate, export, predict) call only ``Tool``'s
methods; which kind a tool directory holds is ``tool_kinds.py``'s business (a closed registry).

One builder serves every size: the official ``vit_b``/``vit_l``/``vit_h`` presets and any custom
architecture (the embedded default's tiny SAM) described by the same fields, saved beside its
state dict as ``sam.yaml``. The image encoder is frozen; its embedding is computed once per image
and shared by every rollout of that image; the prompt encoder and mask decoder are what GRTO trains.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from grto_cli.core.answer import ToolCall
from grto_cli.core.io import atomic_path, write_text

SAM_WEIGHTS = "sam.pt"
SAM_ARCH = "sam.yaml"
SAM_KIND = "sam"
SEG_LOSSES = ("dice_bce", "focal")
# Logit given to pixels of a rollout whose answer could not be parsed: no mask, no gradient.
NO_MASK_LOGIT = -20.0


@dataclass
class SamArch:
    """Every size knob of SAM; the defaults are Meta's ViT-H."""

    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_PRESETS: dict[str, SamArch] = {
    "vit_h": SamArch(),
    "vit_l": SamArch(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                     encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": SamArch(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     encoder_global_attn_indexes=[2, 5, 8, 11]),
}


def resolve_arch(arch: str | dict | SamArch) -> SamArch:
    if isinstance(arch, SamArch):
        return arch
    if isinstance(arch, str):
        if arch not in SAM_PRESETS:
            raise ValueError(f"unknown SAM preset {arch!r}; expected one of {sorted(SAM_PRESETS)} or a dict of SamArch fields")
        return SAM_PRESETS[arch]
    return SamArch(**arch)


def build_sam(arch: str | dict | SamArch) -> Sam:
    """Build an untrained SAM from segment-anything's own modules, as its ``_build_sam`` does."""
    a = resolve_arch(arch)
    embedding_size = a.image_size // a.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=a.encoder_depth, embed_dim=a.encoder_embed_dim, img_size=a.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a.encoder_num_heads,
            patch_size=a.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(a.encoder_global_attn_indexes), window_size=a.window_size,
            out_chans=a.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=a.prompt_embed_dim, image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(a.image_size, a.image_size), mask_in_chans=a.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=a.decoder_depth, embedding_dim=a.prompt_embed_dim,
                                          mlp_dim=a.decoder_mlp_dim, num_heads=a.decoder_num_heads),
            transformer_dim=a.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=a.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def load_sam(path: str | Path, arch: str | dict | SamArch | None = None) -> tuple[Sam, SamArch]:
    """Load SAM weights from a state-dict file (Meta's ``sam_vit_*.pth`` or our ``sam.pt``).

    ``path`` may be the file or a directory holding ``sam.pt`` + ``sam.yaml``; ``arch`` (a preset
    name or SamArch fields) is needed for a bare file, e.g. ``arch="vit_h"`` for Meta's checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        arch_file = path / SAM_ARCH
        if arch is None and arch_file.is_file():
            arch = yaml.safe_load(arch_file.read_text())
        path = path / SAM_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path} (expected Meta's sam_vit_h_4b8939.pth / sam_vit_l_0b3195.pth / "
            f"sam_vit_b_01ec64.pth with tool arch vit_h/vit_l/vit_b, or a directory with {SAM_WEIGHTS} + {SAM_ARCH})")
    if arch is None:
        raise ValueError(f"SAM architecture unknown for {path}: pass a preset (vit_b, vit_l, vit_h) or SamArch fields")
    resolved = resolve_arch(arch)
    sam = build_sam(resolved)
    state = torch.load(path, map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    return sam.eval(), resolved


def save_sam(sam: Sam, arch: SamArch, out_dir: str | Path) -> Path:
    """Write ``sam.pt`` (a segment-anything-compatible state dict) and ``sam.yaml``, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Through a buffer: torch.save names the zip's records after the target file, and the temp
    # file's random name would make identical weights differ byte for byte.
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in sam.state_dict().items()}, buffer)
    with atomic_path(out_dir / SAM_WEIGHTS) as tmp:
        tmp.write_bytes(buffer.getvalue())
    write_text(out_dir / SAM_ARCH, yaml.safe_dump(asdict(arch), sort_keys=True))
    return out_dir / SAM_WEIGHTS


def trainable_tool_parameters(sam: Sam) -> list[torch.nn.Parameter]:
    """What GRTO trains: the prompt encoder and mask decoder, never the image encoder."""
    return list(sam.prompt_encoder.parameters()) + list(sam.mask_decoder.parameters())


# ViT-H's global attention needs ~3 GB per 1024x1024 image: the encoder sees this many images at once.
DEFAULT_ENCODE_BATCH = 4
# Cached embeddings live in CPU memory: ViT-H's is 256x64x64 fp32 = 4 MiB, so 1 GiB holds 256 images.
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class FeatureLevels:
    """A tool's image features at several resolutions (SAM2: two high-resolution maps + the image
    embedding), indexed and concatenated along the image axis like one (B, ...) tensor."""

    levels: tuple[torch.Tensor, ...]  # each (B, C_l, h_l, w_l), highest resolution first

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    def __getitem__(self, index: slice) -> "FeatureLevels":
        if not isinstance(index, slice):
            raise TypeError(f"FeatureLevels are indexed by a slice of images (embeddings[i:i + 1]), got {index!r}")
        return FeatureLevels(tuple(level[index] for level in self.levels))

    @property
    def device(self) -> torch.device:
        return self.levels[0].device

    def to(self, device) -> "FeatureLevels":
        return FeatureLevels(tuple(level.to(device) for level in self.levels))

    def detach(self) -> "FeatureLevels":
        return FeatureLevels(tuple(level.detach() for level in self.levels))

    def float(self) -> "FeatureLevels":
        return FeatureLevels(tuple(level.float() for level in self.levels))

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(level) for level in self.levels)


# What a tool's embed returns: one tensor (B, C, h, w) for SAM, FeatureLevels for SAM2.
Embeddings = Union[torch.Tensor, FeatureLevels]


def _nbytes(t: Embeddings) -> int:
    if isinstance(t, FeatureLevels):
        return t.nbytes
    return t.nelement() * t.element_size()


def cat_embeddings(parts: Sequence[Embeddings]) -> Embeddings:
    """Concatenate per-image embeddings along the image axis."""
    if isinstance(parts[0], FeatureLevels):
        return FeatureLevels(tuple(torch.cat(level) for level in zip(*(p.levels for p in parts))))
    return torch.cat(parts)


def _to_disk(value: Embeddings):
    return {"levels": list(value.levels)} if isinstance(value, FeatureLevels) else value


def _from_disk(value) -> Embeddings:
    return FeatureLevels(tuple(value["levels"])) if isinstance(value, dict) else value


class EmbeddingCache:
    """Image-encoder outputs by image key, kept on the CPU (never on the GPU), least recently used
    first out once they hold more than ``max_bytes`` (every feature level counted); optionally on
    disk too (``disk_dir``)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, disk_dir: str | Path | None = None):
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._items: OrderedDict[str, Embeddings] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def _disk_path(self, key: str) -> Path | None:
        if self.disk_dir is None:
            return None
        return self.disk_dir / (hashlib.sha1(key.encode()).hexdigest() + ".pt")

    def get(self, key: str) -> Embeddings | None:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        path = self._disk_path(key)
        if path is not None and path.is_file():
            value = _from_disk(torch.load(path, map_location="cpu", weights_only=True))
            self._remember(key, value)
            self.hits += 1
            return value
        self.misses += 1
        return None

    def put(self, key: str, value: Embeddings) -> None:
        value = self._remember(key, value)
        path = self._disk_path(key)
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(_to_disk(value), tmp)

    def _remember(self, key: str, value: Embeddings) -> Embeddings:
        value = value.detach().to("cpu")
        if key in self._items:
            self.bytes -= _nbytes(self._items[key])
        self._items[key] = value
        self._items.move_to_end(key)
        self.bytes += _nbytes(value)
        while self.bytes > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)
        return value


def _content_key(image: np.ndarray) -> str:
    """Identifies an image by its pixels, so a batch's duplicates (G copies of one prompt) share one pass."""
    return f"{image.shape}:{hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()}"


class Tool(Protocol):
    """What every user of the tool calls; nothing outside a kind's module reaches into its model.

    ``embed`` runs the frozen image encoder once per distinct image (cached by key within the
    cache's byte budget); ``decode`` turns N calls on one image into differentiable mask logits at
    the image's size; GRTO trains ``trainable_parameters()`` (prompt encoder + mask decoder) and
    nothing else; ``module`` holds every weight (what DDP wraps through ``grto.ToolLossTerms``);
    ``save``/``load_weights`` write and read the system's ``tool/`` directory.
    """

    kind: str  # a key of tool_kinds.TOOL_KINDS
    embedding_cache: "EmbeddingCache"
    encode_batch: int

    @property
    def device(self) -> torch.device: ...

    @property
    def module(self) -> torch.nn.Module: ...

    def embed(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None) -> Embeddings: ...

    def encode_trainable(self, images: Sequence[np.ndarray]) -> Embeddings:
        """The image encoder's pass with gradients, no cache: pretraining a tool from scratch only."""

    def decode(self, embedding: Embeddings, calls: Sequence[ToolCall | None],
               original_size: tuple[int, int]) -> torch.Tensor: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def freeze_image_encoder(self) -> None: ...

    def freeze(self) -> None: ...

    def train(self, mode: bool = True) -> "Tool": ...

    def save(self, directory: str | Path) -> Path: ...

    def load_weights(self, directory: str | Path) -> None: ...


def embed_cached(images: Sequence[np.ndarray], keys: Sequence[str] | None, cache: EmbeddingCache,
                 encode_batch: int, device: torch.device,
                 encode: Callable[[list[np.ndarray]], Embeddings]) -> Embeddings:
    """The embedding loop every kind shares: keyed images are read from the cache when there; every
    other distinct image (by key, else by its pixels) goes through ``encode`` (a kind's
    ``encode_trainable``) once, in chunks of ``encode_batch`` images, under bf16 autocast on CUDA,
    kept in float32; the result is on ``device``, one entry per image in order."""
    keys = list(keys) if keys is not None else [None] * len(images)
    ids = [k if k else _content_key(im) for k, im in zip(keys, images)]
    found: dict[str, Embeddings] = {}
    pending: set[str] = set()
    todo: list[int] = []  # first index of each distinct image that still needs the encoder
    for i, (key, ident) in enumerate(zip(keys, ids)):
        if ident in found or ident in pending:
            continue
        cached = cache.get(key) if key else None
        if cached is None:
            todo.append(i)
            pending.add(ident)
        else:
            found[ident] = cached
    for start in range(0, len(todo), encode_batch):
        chunk = todo[start:start + encode_batch]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            fresh = encode([images[i] for i in chunk])  # (b, ...)
        fresh = fresh.float()
        for j, i in enumerate(chunk):
            emb = fresh[j:j + 1]
            found[ids[i]] = emb
            if keys[i]:
                cache.put(keys[i], emb)
    return cat_embeddings([found[ident].to(device) for ident in ids])


def decode_grouped(calls: Sequence[ToolCall | None], original_size: tuple[int, int], device: torch.device,
                   decode_group: Callable[[list[ToolCall], bool, int], torch.Tensor]) -> torch.Tensor:
    """Mask logits (N, H, W) for N calls on one image: calls with the same prompt structure (box or
    not, number of points) go through ``decode_group(calls, has_box, n_points)`` -> (n, H, W)
    together; a None call (an unparsable answer) gives a constant NO_MASK_LOGIT map, no gradient."""
    h, w = original_size
    logits: list[torch.Tensor | None] = [None] * len(calls)
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, call in enumerate(calls):
        if call is not None and (call.box is not None or call.points):
            groups.setdefault((call.box is not None, len(call.points)), []).append(i)
    for (has_box, n_points), idx in sorted(groups.items()):
        masks = decode_group([calls[i] for i in idx], has_box, n_points)
        for j, i in enumerate(idx):
            logits[i] = masks[j]
    empty = torch.full((h, w), NO_MASK_LOGIT, device=device)
    return torch.stack([m if m is not None else empty for m in logits])


class SamTool:
    """Kind "sam": batched, differentiable decoding of parsed tool calls into mask logits."""

    kind = SAM_KIND

    def __init__(self, sam: Sam, arch: SamArch, cache: EmbeddingCache | None = None,
                 encode_batch: int = DEFAULT_ENCODE_BATCH):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be at least 1, got {encode_batch}")
        self.sam = sam
        self.arch = arch
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.embedding_cache = cache if cache is not None else EmbeddingCache()
        self.encode_batch = encode_batch

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def module(self) -> torch.nn.Module:
        return self.sam

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return trainable_tool_parameters(self.sam)

    def freeze_image_encoder(self) -> None:
        self.sam.image_encoder.requires_grad_(False)
        self.sam.image_encoder.eval()

    def freeze(self) -> None:
        self.sam.requires_grad_(False)

    def train(self, mode: bool = True) -> "SamTool":
        self.sam.prompt_encoder.train(mode)
        self.sam.mask_decoder.train(mode)
        self.sam.image_encoder.eval()
        return self

    def save(self, directory: str | Path) -> Path:
        """``sam.pt`` + ``sam.yaml``, as before the Tool interface: no kind file (absent means "sam")."""
        return save_sam(self.sam, self.arch, directory)

    def load_weights(self, directory: str | Path) -> None:
        from grto_cli.core.tool_kinds import check_kind

        check_kind(directory, self.kind)
        sam, _ = load_sam(directory)
        self.sam.load_state_dict(sam.state_dict())

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.transform.get_preprocess_shape(original_size[0], original_size[1], self.sam.image_encoder.img_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None].float()
        return self.sam.preprocess(x)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None) -> torch.Tensor:
        """Frozen image-encoder embeddings (B, C, h, w) on the tool's device (``embed_cached``),
        encoded under bf16 autocast on CUDA."""
        return embed_cached(images, keys, self.embedding_cache, self.encode_batch, self.device,
                            self.encode_trainable)

    def encode_trainable(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.sam.image_encoder(torch.cat([self.preprocess(im) for im in images]))  # (b, C, h, w)

    def decode(self, embedding: torch.Tensor, calls: Sequence[ToolCall | None],
               original_size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (N, H, W) at the original image size for N calls on one image (``decode_grouped``)."""
        input_size = self.input_size(original_size)
        def group(calls: list[ToolCall], has_box: bool, n_points: int) -> torch.Tensor:
            return self._decode_group(embedding, calls, has_box, n_points, input_size, original_size)

        return decode_grouped(calls, original_size, embedding.device, group)

    def _decode_group(self, embedding: torch.Tensor, calls: list[ToolCall], has_box: bool, n_points: int,
                      input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
        points = boxes = None
        if n_points:
            coords = np.array([[list(p) for p in c.points] for c in calls], dtype=np.float32)
            coords = self.transform.apply_coords(coords, original_size)
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
            points = (torch.as_tensor(coords, device=self.device), labels)
        if has_box:
            box = self.transform.apply_boxes(np.array([c.box for c in calls], dtype=np.float32), original_size)
            boxes = torch.as_tensor(box, device=self.device)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        return self.sam.postprocess_masks(low_res, input_size, original_size)[:, 0]  # (n, H, W)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice_bce",
             focal_gamma: float = 2.0) -> torch.Tensor:
    """Per-sample segmentation loss (N,) of mask logits (N, H, W) against boolean targets (N, H, W)."""
    target = target.float()
    prob = torch.sigmoid(logits)
    inter = (prob * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    if kind == "dice_bce":
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
        return dice + bce
    if kind == "focal":
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = prob * target + (1 - prob) * (1 - target)
        focal = (ce * (1 - p_t) ** focal_gamma).flatten(1).mean(1)
        return dice + 20.0 * focal  # SAM's own 20:1 focal:dice weighting
    raise ValueError(f"unknown seg loss {kind!r}; expected one of {SEG_LOSSES}")
