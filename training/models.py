"""The seed architectures, and the wrapper that puts normalisation and softmax into the graph.

Every network takes normalised NCHW float32 and returns logits. `Classifier` adds the dataset's
normalisation in front, so training feeds pixels in [0, 1]; `Classifier.probabilities()` adds the
softmax and is exactly what export writes (Normalize -> net -> Softmax).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from training.errors import TrainingError


class FashionMLP(nn.Module):
    """The PyTorch quickstart tutorial's FashionMNIST network."""

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Cifar10CNN(nn.Module):
    """The CIFAR10 tutorial's network: three conv/pool stages and no activations, as specified."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet5(nn.Module):
    """LeNet-5 as in the PyTorch neural-networks tutorial (1x32x32 input)."""

    input_shape = (1, 32, 32)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "fashion_mlp": FashionMLP,
    "cifar10_cnn": Cifar10CNN,
    "lenet5": LeNet5,
}


def architecture(arch: str) -> type[nn.Module]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        choices = ", ".join(sorted(ARCHITECTURES))
        raise TrainingError(f"unknown architecture {arch!r} (choose from: {choices})") from None


def input_shape(arch: str) -> tuple[int, int, int]:
    return tuple(architecture(arch).input_shape)  # type: ignore[return-value]


def create_model(arch: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised network of a registered architecture."""
    if num_classes < 2:
        raise TrainingError(f"a classifier needs at least 2 classes, got {num_classes}")
    return architecture(arch)(num_classes=num_classes)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std; buffers, so the statistics travel in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std need one value per channel")
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Pixels in [0, 1] -> logits. Training uses this; export uses `probabilities()`."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def probabilities(self) -> nn.Module:
        """The served graph, sharing this module's weights: Normalize -> net -> Softmax."""
        return nn.Sequential(
            OrderedDict(normalize=self.normalize, net=self.net, softmax=nn.Softmax(dim=1))
        )


def build_classifier(
    arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> Classifier:
    channels = input_shape(arch)[0]
    if len(mean) != channels or len(std) != channels:
        raise TrainingError(
            f"{arch} takes {channels} channel(s) but the normalisation has {len(mean)} value(s)"
        )
    return Classifier(create_model(arch, num_classes), mean, std)
