"""Frozen image and text encoders that yield token maps for the ranking-aware adapter.

* image side: :class:`ImageTokenEncoder` — PIL images (or paths, or an already preprocessed pixel
  tensor) → float32 tokens ``(N, P, D)``. :class:`EfficientNetTokens` flattens EfficientNet-Lite0's
  ``extract_features`` map (7×7×1280 = 49 tokens at 224 px); :class:`CLIPVisionTokens` takes a
  ``transformers`` CLIP vision tower's patch tokens.
* text side: :class:`HFTextTokens` — instructions → float32 ``last_hidden_state`` ``(B, T, D)`` and a
  bool mask ``(B, T)``, for the bundled all-MiniLM-L6-v2 or a CLIP text tower.
* :class:`RankingEncoders` holds one of each, frozen: the model the ranking adapter attaches to.

Every encoder has a ``fingerprint``: sha256 over its preprocessing settings, its tokenizer (text),
its weights (``io.fingerprint.weights_hash``, bf16-rounded values: an edit below bf16 resolution is
not seen) and buffers (BatchNorm statistics).
Plain PyTorch: torchvision, timm and open_clip do not import beside this project's torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import ConfigError, DataNotFoundError
from ...io.fingerprint import tensor_digest, weights_hash

if TYPE_CHECKING:
    from PIL.Image import Image

ImageInput = Union["Image", str, Path]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """RGB, bicubic resize of the whole image to ``size``×``size`` (no crop, as in the ranking
    adapter's official code), scale to [0, 1], then ``(x - mean) / std`` per channel."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 8:
            raise ConfigError(f"image size must be an integer >= 8, got {self.size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ConfigError(f"{name} must be three numbers, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.std) <= 0:
            raise ConfigError(f"std must be positive, got {self.std}")

    def __call__(self, images: Sequence[ImageInput]) -> Tensor:
        from PIL import Image as PILImage

        arrays = [np.asarray(open_image(im).convert("RGB").resize((self.size, self.size), PILImage.Resampling.BICUBIC),
                             dtype=np.uint8) for im in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std


def open_image(image: ImageInput) -> "Image":
    """A PIL image as given, or the image file at a path (read fully, so the file is closed)."""
    from PIL import Image as PILImage, UnidentifiedImageError

    if isinstance(image, PILImage.Image):
        return image
    if isinstance(image, (str, Path)):
        try:
            with PILImage.open(image) as handle:
                handle.load()
                return handle.copy()
        except FileNotFoundError:
            raise DataNotFoundError(f"image not found: {image}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"{image}: not a readable image ({exc})") from None
    raise ConfigError(f"images must be PIL images or paths, got {type(image).__name__}")


def module_fingerprint(module: nn.Module, settings: dict[str, Any]) -> str:
    """sha256 of ``settings`` (JSON), every parameter (bf16-rounded, via ``io.fingerprint``) and
    every buffer: BatchNorm statistics change the tokens as much as weights do."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(weights_hash(module, [""], full=True).encode())
    for name, buffer in sorted(module.named_buffers(), key=lambda item: item[0]):
        h.update(f"{name}:{tensor_digest(buffer.float())};".encode())
    return h.hexdigest()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _grad_context(module: nn.Module) -> contextlib.AbstractContextManager:
    # frozen encoders run without autograd; a trainable adapter on an encoder (LoRA) keeps its graph
    return contextlib.nullcontext() if any(p.requires_grad for p in module.parameters()) else torch.no_grad()


class ImageTokenEncoder(nn.Module):
    """Images → float32 tokens ``(N, num_tokens, token_dim)``; subclasses implement ``forward``
    on preprocessed pixels ``(N, 3, size, size)``. ``grid`` is the tokens' ``(rows, cols)`` layout
    (row-major), ``None`` when the tokens are not a spatial grid (a kept class token)."""

    token_dim: int
    num_tokens: int
    grid: tuple[int, int] | None

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess

    def settings(self) -> dict[str, Any]:
        """Everything besides the weights that decides the tokens (part of the fingerprint)."""
        return {"encoder": type(self).__name__, "preprocess": dataclasses.asdict(self.preprocess)}

    @property
    def fingerprint(self) -> str:
        """sha256 of the settings, weights and buffers; recomputed on every access (weights may change)."""
        return module_fingerprint(self, self.settings())

    def pixels(self, images: Sequence[ImageInput] | Tensor) -> Tensor:
        """Preprocessed pixels: images are preprocessed; a float tensor ``(N, 3, size, size)`` is
        taken as already preprocessed (by :attr:`preprocess`)."""
        if isinstance(images, Tensor):
            size = self.preprocess.size
            if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size) or not images.is_floating_point():
                raise ConfigError(f"pixel tensors must be float (N, 3, {size}, {size}), got "
                                  f"{images.dtype} {tuple(images.shape)}")
            return images
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence) or len(images) == 0:
            raise ConfigError("images must be a non-empty sequence of PIL images or paths, or a pixel tensor")
        return self.preprocess(images)

    def tokens(self, images: Sequence[ImageInput] | Tensor) -> Tensor:
        """Float32 tokens ``(N, num_tokens, token_dim)`` on the encoder's device."""
        pixels = self.pixels(images)
        with _grad_context(self):
            return self(pixels.to(_device(self))).float()


class EfficientNetTokens(ImageTokenEncoder):
    """EfficientNet(-Lite) ``extract_features`` (B, C, H, W) flattened row-major to (B, H·W, C)."""

    def __init__(self, backbone: nn.Module, size: int = 224) -> None:
        super().__init__(Preprocess(size))  # the Lite models were trained with mean = std = 0.5
        self.backbone = backbone
        self.token_dim = int(backbone._conv_head.out_channels)
        side = -(-size // 32)  # stride 32 with "same" padding
        self.grid = (side, side)
        self.num_tokens = side * side

    def forward(self, pixels: Tensor) -> Tensor:
        return self.backbone.extract_features(pixels).flatten(2).transpose(1, 2)


class CLIPVisionTokens(ImageTokenEncoder):
    """Patch tokens of a ``transformers`` CLIP vision tower (``CLIPModel`` or ``CLIPVisionModel``):
    ``last_hidden_state`` (before ``post_layernorm``, which CLIP applies to the pooled class token only).
    The class token is dropped by default so the tokens form the patch grid (and can be pooled);
    ``keep_class_token=True`` keeps it first (``grid`` is then ``None``)."""

    def __init__(self, model: nn.Module, keep_class_token: bool = False,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        tower = getattr(model, "vision_model", model)
        config = getattr(tower, "config", None)
        if config is None or not hasattr(config, "image_size") or not hasattr(config, "patch_size"):
            raise ConfigError(f"{type(model).__name__} is not a CLIP vision tower (no config.image_size/patch_size)")
        super().__init__(Preprocess(int(config.image_size), tuple(mean), tuple(std)))
        self.tower = tower
        self.keep_class_token = bool(keep_class_token)
        self.token_dim = int(config.hidden_size)
        side = int(config.image_size) // int(config.patch_size)
        self.grid = None if self.keep_class_token else (side, side)
        self.num_tokens = side * side + int(self.keep_class_token)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "keep_class_token": self.keep_class_token}

    def forward(self, pixels: Tensor) -> Tensor:
        hidden = self.tower(pixel_values=pixels).last_hidden_state
        return hidden if self.keep_class_token else hidden[:, 1:]


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        # a fast tokenizer serialises completely (vocabulary, normaliser, lower-casing), including the
        # padding/truncation state its last call left behind: dropped, every call sets its own
        state = json.loads(backend.to_str())
        text = json.dumps({k: v for k, v in state.items() if k not in ("padding", "truncation")}, sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


class HFTextTokens(nn.Module):
    """Instructions → ``last_hidden_state`` of a ``transformers`` text encoder (BertModel, a CLIP
    text tower, ...) as float32 ``(B, T, D)`` and a bool mask ``(B, T)`` (True: a real token).
    Instructions are truncated to ``max_length`` tokens; padding is on the right."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "hidden_size"):
            raise ConfigError(f"{type(model).__name__} has no config.hidden_size: not a transformers text encoder")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab}")
        self.model = model
        self.tokenizer = tokenizer  # not a module: never saved, but part of the fingerprint
        self.max_length = max_length
        self.token_dim = int(config.hidden_size)

    def settings(self) -> dict[str, Any]:
        return {"encoder": type(self).__name__, "model": type(self.model).__name__, "max_length": self.max_length,
                "tokenizer": _tokenizer_digest(self.tokenizer)}

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer, settings, weights and buffers; recomputed on every access."""
        return module_fingerprint(self, self.settings())

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def tokens(self, instructions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(tokens float32 (B, T, D), mask bool (B, T))`` on the encoder's device."""
        if isinstance(instructions, str) or not isinstance(instructions, Sequence) or not instructions \
                or not all(isinstance(s, str) and s.strip() for s in instructions):
            raise ConfigError("instructions must be a non-empty list of non-empty strings")
        batch = self.tokenizer(list(instructions), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = _device(self)
        mask = batch["attention_mask"].to(device)
        with _grad_context(self):
            hidden = self(batch["input_ids"].to(device), mask).float()
        return hidden, mask.bool()


class RankingEncoders(nn.Module):
    """A frozen image encoder and a frozen text encoder: the model the ranking adapter attaches to
    (``ak.attach``/``ak.save``/``ak.load`` fingerprint both). They stay in eval mode even when the
    model is put in training mode (BatchNorm statistics and dropout must not change), so only the
    attached adapters train. The model has no ``forward``: applications call :meth:`image_tokens`
    and :meth:`text_tokens`."""

    def __init__(self, image_encoder: ImageTokenEncoder, text_encoder: HFTextTokens) -> None:
        if not isinstance(image_encoder, ImageTokenEncoder):
            raise ConfigError(f"image_encoder must be an ImageTokenEncoder, got {type(image_encoder).__name__}")
        if not isinstance(text_encoder, HFTextTokens):
            raise ConfigError(f"text_encoder must be an HFTextTokens, got {type(text_encoder).__name__}")
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.requires_grad_(False)
        self.eval()

    @property
    def image_token_dim(self) -> int:
        return self.image_encoder.token_dim

    @property
    def num_image_tokens(self) -> int:
        return self.image_encoder.num_tokens

    @property
    def text_token_dim(self) -> int:
        return self.text_encoder.token_dim

    def train(self, mode: bool = True) -> "RankingEncoders":
        super().train(mode)
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    def image_tokens(self, images: Sequence[ImageInput] | Tensor) -> Tensor:
        """Float32 ``(N, num_image_tokens, image_token_dim)``."""
        return self.image_encoder.tokens(images)

    def text_tokens(self, instructions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(float32 (B, T, text_token_dim), bool mask (B, T))``."""
        return self.text_encoder.tokens(instructions)


def efficientnet_minilm(image_size: int = 224, max_length: int = 64) -> RankingEncoders:
    """The offline default pair: EfficientNet-Lite0 (ImageNet) image tokens (49 × 1280 at 224 px)
    and the bundled all-MiniLM-L6-v2 text tokens (D = 384). Loads in a few seconds, nothing downloads."""
    from transformers import AutoModel, AutoTokenizer

    from ...zoo.models import minilm_path
    from ...zoo.vision import load_efficientnet_lite0

    backbone = load_efficientnet_lite0(num_classes=1).backbone
    backbone._fc = nn.Identity()  # the (fresh) classifier head is never used by extract_features
    path = minilm_path()
    text = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    return RankingEncoders(EfficientNetTokens(backbone, image_size),
                           HFTextTokens(text, AutoTokenizer.from_pretrained(str(path)), max_length))


def clip_pair(clip_model: nn.Module, tokenizer: Any = None, keep_class_token: bool = False,
              max_length: int | None = None) -> RankingEncoders:
    """The vision and text towers of a ``transformers.CLIPModel`` (patch tokens, text token states).
    ``tokenizer`` defaults to the one saved beside the model (``config._name_or_path``, local files
    only); a randomly initialised model needs one passed in, whose vocabulary fits the model's."""
    if not hasattr(clip_model, "vision_model") or not hasattr(clip_model, "text_model"):
        raise ConfigError(f"{type(clip_model).__name__} is not a CLIPModel (no vision_model/text_model)")
    if tokenizer is None:
        source = getattr(clip_model.config, "_name_or_path", "")
        if not source or not Path(source).is_dir():
            raise ConfigError("clip_pair needs tokenizer=...: the model was not loaded from a local directory")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    text_model = clip_model.text_model
    positions = int(text_model.config.max_position_embeddings)
    text = HFTextTokens(text_model, tokenizer, min(positions, max_length or positions))
    return RankingEncoders(CLIPVisionTokens(clip_model, keep_class_token), text)
