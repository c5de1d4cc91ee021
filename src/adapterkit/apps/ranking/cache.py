"""An on-disk cache of frozen-encoder tokens: each image and each instruction goes through its
encoder once; training reads the stored tokens.

One safetensors file per item, ``ROOT/images/ab/<key>.safetensors`` or ``ROOT/texts/ab/<key>.safetensors``,
written atomically (``io.safefiles``). The key is sha256 of the encoder's fingerprint (weights,
buffers, preprocessing, tokenizer), the item's content (an image's mode, size, palette and pixel
bytes — the same for a path and for the image opened from it; an instruction's exact text) and the
settings that shape the stored tokens. A changed encoder or setting therefore reads other files:
old entries are never served (nor deleted — remove ``ROOT`` to reclaim the space).

Size bounds for images (texts are small and always stored in float32, all their tokens):

* ``dtype``: storage precision, ``"float16"`` by default: it halves the files and costs nothing
  measurable. EfficientNet-Lite0 tokens are ReLU6 outputs in [0, 6] (about 90% exact zeros on
  photos); float16 rounds each to 11 significant bits. Measured on 32 crops of real photos: max
  relative error 4.9e-4 (max absolute 2.0e-3), every token's cosine with its fp32 value
  ≥ 1 − 3e-7. ``"bfloat16"`` (8 bits) is 8× coarser (3.9e-3) at the same size; ``"float32"`` is exact.
  Bytes per image at 49 × 1280: 251 KB fp32, 126 KB fp16; fp16 with ``pool=2`` 41 KB, with
  ``project_dim=256`` 25 KB, with both 8.5 KB.
* ``pool=k``: k×k average pooling of the token grid (stride k, edge windows averaged over the
  cells they cover), e.g. 7×7 → 4×4 = 16 tokens for k = 2. Needs a grid (no kept class token).
* ``project_dim=d``: a fixed projection of every token onto a random d-dimensional subspace
  (orthonormal columns from the QR of a Gaussian drawn from ``project_seed``), after pooling.

Tokens are always returned as float32: a freshly computed item comes back exactly as it will be
read later (rounded to the storage dtype first). A damaged or foreign file under a key raises
:class:`~adapterkit.errors.CorruptFileError` naming it (nothing is silently recomputed: with atomic
writes a damaged file means a disk or a person changed it); delete the file to recompute it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.state import active_records, peek_state
from ...errors import ConfigError, CorruptFileError, UnsupportedError
from ...io.safefiles import read_metadata, read_tensors, write_tensors
from .encoders import ImageInput, RankingEncoders, open_image

FORMAT = "adapterkit-token-cache/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """What shapes the stored image tokens (all of it is part of the image keys)."""

    dtype: str = "float16"
    pool: int = 1
    project_dim: int | None = None
    project_seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name, value, low in (("pool", self.pool, 1), ("project_seed", self.project_seed, 0),
                                 ("project_dim", 1 if self.project_dim is None else self.project_dim, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def projection_matrix(dim: int, out_dim: int, seed: int) -> Tensor:
    """``(dim, out_dim)`` float32 with orthonormal columns, the same for a seed on every run."""
    gaussian = torch.randn(dim, out_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).float()  # signs fixed: QR's are not unique


def pool_grid(tokens: Tensor, grid: tuple[int, int], k: int) -> Tensor:
    """k×k average pooling of row-major grid tokens ``(N, rows·cols, D)`` → ``(N, ⌈rows/k⌉·⌈cols/k⌉, D)``."""
    n, _, dim = tokens.shape
    maps = tokens.transpose(1, 2).reshape(n, dim, *grid)
    # ceil_mode: the last, partial window averages only the cells inside the grid
    return F.avg_pool2d(maps, k, stride=k, ceil_mode=True).flatten(2).transpose(1, 2)


def image_digest(image: ImageInput) -> str:
    """sha256 of an image's decoded content (mode, size, palette, pixel bytes)."""
    image = open_image(image)
    h = hashlib.sha256(f"{image.mode};{image.size}".encode())
    palette = image.getpalette() if image.mode in ("P", "PA") else None
    h.update(json.dumps(palette).encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _check_encoders_plain(encoders: RankingEncoders) -> None:
    """Cached tokens are the base encoders' outputs: refuse while an adapter changes them."""
    own = peek_state(encoders)
    for state, record in active_records(encoders):
        # a model-level adapter of RankingEncoders itself (the ranking adapter) runs around its
        # forward, which token extraction never calls
        if state is own and record.targets == ("",) and not record.copies:
            continue
        raise UnsupportedError(f"adapter {record.name!r} is active on the encoders: their tokens are not the "
                               "cached base tokens; deactivate it (ak.activate(model, [])) before using the cache")


class TokenCache:
    """Tokens of ``encoders`` stored under ``root`` (see the module docstring for keys and sizes).

    ``hits``/``misses`` count distinct items per call served from disk / computed. Every call
    fingerprints the encoder it uses (about 10 ms for EfficientNet-Lite0, 50 ms for MiniLM), so
    pass many items per call (all instructions at once to :meth:`text_batch`)."""

    def __init__(self, root: str | Path, encoders: RankingEncoders, *, dtype: str = "float16", pool: int = 1,
                 project_dim: int | None = None, project_seed: int = 0, batch_size: int = 16,
                 progress: bool = True) -> None:
        if not isinstance(encoders, RankingEncoders):
            raise ConfigError(f"encoders must be RankingEncoders, got {type(encoders).__name__}")
        settings = CacheSettings(dtype, pool, project_dim, project_seed)
        image = encoders.image_encoder
        if pool > 1 and image.grid is None:
            raise ConfigError(f"pool={pool} needs grid tokens; {type(image).__name__} keeps a class token")
        if project_dim is not None and project_dim > image.token_dim:
            raise ConfigError(f"project_dim must be at most the token dimension {image.token_dim}, got {project_dim}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.root = Path(root)
        self.encoders = encoders
        self.settings = settings
        self.batch_size = batch_size
        self.progress = progress
        self.hits = 0
        self.misses = 0
        self._projection = None if project_dim is None else projection_matrix(image.token_dim, project_dim,
                                                                              project_seed)

    @property
    def token_dim(self) -> int:
        """Dimension of the stored image tokens (``project_dim`` when projecting)."""
        return self.settings.project_dim or self.encoders.image_token_dim

    @property
    def num_tokens(self) -> int:
        """Number of stored tokens per image (after pooling)."""
        grid, k = self.encoders.image_encoder.grid, self.settings.pool
        if k == 1 or grid is None:
            return self.encoders.num_image_tokens
        return -(-grid[0] // k) * -(-grid[1] // k)

    # -- keys and files ------------------------------------------------------------------------
    def _key(self, kind: str, encoder: str, content: str) -> str:
        fields = {"format": FORMAT, "kind": kind, "encoder": encoder, "content": content}
        if kind == "image":
            fields["settings"] = dataclasses.asdict(self.settings)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def image_key(self, image: ImageInput, fingerprint: str | None = None) -> str:
        """The key of an image's tokens under the current encoder and settings."""
        return self._key("image", fingerprint or self.encoders.image_encoder.fingerprint, image_digest(image))

    def text_key(self, instruction: str, fingerprint: str | None = None) -> str:
        """The key of an instruction's tokens under the current text encoder."""
        return self._key("text", fingerprint or self.encoders.text_encoder.fingerprint,
                         hashlib.sha256(instruction.encode()).hexdigest())

    def path(self, kind: str, key: str) -> Path:
        """Where the tokens under ``key`` live (``kind``: ``"image"`` or ``"text"``)."""
        return self.root / f"{kind}s" / key[:2] / f"{key}.safetensors"

    def _read(self, kind: str, key: str, shape: tuple[int | None, int], dtype: torch.dtype) -> Tensor | None:
        path = self.path(kind, key)
        if not path.is_file():
            return None
        meta = read_metadata(path)
        if meta.get("format") != FORMAT or meta.get("key") != key or "digest" not in meta:
            raise CorruptFileError(f"{path}: not the token-cache entry for key {key}; delete the file to recompute it")
        tokens = read_tensors(path, meta["digest"]).get("tokens")
        if tokens is None or tokens.dtype != dtype or tokens.dim() != 2 or tokens.shape[1] != shape[1] \
                or tokens.shape[0] < 1 or (shape[0] is not None and tokens.shape[0] != shape[0]):
            raise CorruptFileError(f"{path}: stored tokens have the wrong dtype or shape; delete the file to recompute it")
        return tokens

    def _write(self, kind: str, key: str, tokens: Tensor) -> None:
        write_tensors(self.path(kind, key), {"tokens": tokens}, {"format": FORMAT, "key": key, "kind": kind},
                      digest_key="digest")

    # -- images ----------------------------------------------------------------------------------
    def _shrink(self, tokens: Tensor) -> Tensor:
        """Pooling, projection and storage rounding of freshly computed tokens ``(N, P, D)``."""
        tokens = tokens.detach().float().cpu()
        if self.settings.pool > 1:
            tokens = pool_grid(tokens, self.encoders.image_encoder.grid, self.settings.pool)
        if self._projection is not None:
            tokens = tokens @ self._projection
        if self.settings.dtype == "float16" and tokens.abs().max() > torch.finfo(torch.float16).max:
            raise ConfigError("tokens exceed the float16 range; use dtype='bfloat16' or 'float32'")
        return tokens.to(DTYPES[self.settings.dtype])

    def image_tokens(self, images: Sequence[ImageInput]) -> Tensor:
        """Float32 tokens ``(N, num_tokens, token_dim)`` of ``images`` (PIL images or paths), in order;
        the encoder runs, in batches of ``batch_size``, only on images not stored yet."""
        from tqdm.auto import tqdm

        if isinstance(images, (str, Path)) or not isinstance(images, Sequence) or len(images) == 0:
            raise ConfigError("images must be a non-empty sequence of PIL images or paths")
        _check_encoders_plain(self.encoders)
        opened = [open_image(image) for image in images]
        fingerprint = self.encoders.image_encoder.fingerprint
        keys = [self.image_key(image, fingerprint) for image in opened]
        dtype = DTYPES[self.settings.dtype]
        found: dict[str, Tensor] = {}
        missing: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in found or key in missing:
                continue
            tokens = self._read("image", key, (self.num_tokens, self.token_dim), dtype)
            if tokens is None:
                missing[key] = i
            else:
                found[key] = tokens
        self.hits += len(found)
        self.misses += len(missing)
        todo = list(missing.items())
        with tqdm(total=len(todo), desc="image tokens", unit="img", disable=not self.progress or not todo) as bar:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                stored = self._shrink(self.encoders.image_tokens([opened[i] for _, i in chunk]))
                for (key, _), tokens in zip(chunk, stored):
                    self._write("image", key, tokens)
                    found[key] = tokens
                bar.update(len(chunk))
        return torch.stack([found[key] for key in keys]).float()

    # -- instructions ------------------------------------------------------------------------------
    def text_tokens(self, instruction: str) -> tuple[Tensor, Tensor]:
        """``(float32 (T, D), bool mask (T,))`` of one instruction (every token real: no padding)."""
        tokens, mask = self.text_batch([instruction])
        length = int(mask[0].sum())
        return tokens[0, :length], mask[0, :length]

    def text_batch(self, instructions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(float32 (B, T, D), bool mask (B, T))``, padded on the right to the longest instruction."""
        if isinstance(instructions, str) or not isinstance(instructions, Sequence) or not instructions \
                or not all(isinstance(s, str) and s.strip() for s in instructions):
            raise ConfigError("instructions must be a non-empty list of non-empty strings")
        _check_encoders_plain(self.encoders)
        fingerprint = self.encoders.text_encoder.fingerprint
        keys = [self.text_key(text, fingerprint) for text in instructions]
        dim = self.encoders.text_token_dim
        found: dict[str, Tensor] = {}
        missing: dict[str, str] = {}
        for key, text in zip(keys, instructions):
            if key not in found and key not in missing:
                tokens = self._read("text", key, (None, dim), torch.float32)
                if tokens is None:
                    missing[key] = text
                else:
                    found[key] = tokens
        self.hits += len(found)
        self.misses += len(missing)
        todo = list(missing.items())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            hidden, mask = self.encoders.text_tokens([text for _, text in chunk])
            for (key, _), states, valid in zip(chunk, hidden.detach().cpu(), mask.cpu()):
                found[key] = states[valid].contiguous()
                self._write("text", key, found[key])
        length = max(found[key].shape[0] for key in keys)
        out = torch.zeros(len(keys), length, dim)
        mask = torch.zeros(len(keys), length, dtype=torch.bool)
        for row, key in enumerate(keys):
            out[row, :found[key].shape[0]] = found[key]
            mask[row, :found[key].shape[0]] = True
        return out, mask
