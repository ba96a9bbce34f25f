"""A deterministic, learnable stand-in dataset for machines without the real data.

Each class has a smooth random template; an image is its class template with random contrast,
brightness and pixel noise, clipped to [0, 1]. The same seed gives the same images everywhere, so
a checkpoint's test accuracy can be reproduced later from its recorded arguments alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TRAIN_SIZE = 2000
DEFAULT_TEST_SIZE = 500
DEFAULT_NUM_CLASSES = 10


def class_names(num_classes: int = DEFAULT_NUM_CLASSES) -> list[str]:
    """Names that say what the data is, so a served synthetic model cannot pass for a real one."""
    return [f"synthetic_{i}" for i in range(num_classes)]


def templates(num_classes: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """One smooth pattern per class: coarse 4x4 noise upsampled to the image size."""
    channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def make_split(
    shape: tuple[int, int, int],
    size: int,
    *,
    seed: int,
    train: bool,
    num_classes: int = DEFAULT_NUM_CLASSES,
    noise: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 N x C x H x W in [0, 1], labels int64 N), balanced over the classes."""
    if size < 1:
        raise ValueError("a synthetic split needs at least one image")
    patterns = templates(num_classes, shape, seed)
    generator = torch.Generator().manual_seed(seed * 2 + (1 if train else 2))
    labels = torch.arange(size) % num_classes
    labels = labels[torch.randperm(size, generator=generator)]
    contrast = 0.6 + 0.4 * torch.rand(size, 1, 1, 1, generator=generator)
    brightness = 0.2 * (torch.rand(size, 1, 1, 1, generator=generator) - 0.5)
    pixels = torch.randn(size, *shape, generator=generator) * noise
    images = (patterns[labels] - 0.5) * contrast + 0.5 + brightness + pixels
    return images.clamp_(0.0, 1.0).contiguous(), labels.to(torch.int64)
