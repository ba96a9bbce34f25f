"""The seed architectures and the wrapper that carries normalisation and softmax."""

from __future__ import annotations

import pytest
import torch

from training.errors import TrainingError
from training.models import ARCHITECTURES, Classifier, build_classifier, create_model

# Parameter counts of the architectures as specified (weights + biases of every layer).
EXPECTED_PARAMETERS = {
    "fashion_mlp": (784 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10),
    "cifar10_cnn": (3 * 32 * 25 + 32)
    + (32 * 32 * 25 + 32)
    + (32 * 64 * 25 + 64)
    + (1024 * 64 + 64)
    + (64 * 10 + 10),
    "lenet5": (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + 850,
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_shapes_and_size(arch: str) -> None:
    model = create_model(arch)
    shape = ARCHITECTURES[arch].input_shape
    assert model(torch.rand(3, *shape)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS[arch]
    assert create_model(arch, num_classes=4)(torch.rand(2, *shape)).shape == (2, 4)


def test_unknown_architecture_lists_the_choices() -> None:
    with pytest.raises(TrainingError) as caught:
        create_model("resnet50")
    message = str(caught.value)
    assert "resnet50" in message
    assert all(name in message for name in ARCHITECTURES)


def test_classifier_normalises_inside_and_softmax_is_the_served_head() -> None:
    torch.manual_seed(0)
    model = build_classifier("cifar10_cnn", 10, [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]).eval()
    assert isinstance(model, Classifier)
    x = torch.rand(5, 3, 32, 32)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_logits = model.net((x - mean) / std)
        torch.testing.assert_close(model(x), expected_logits)
        probabilities = model.probabilities()(x)
    torch.testing.assert_close(probabilities, torch.softmax(expected_logits, dim=1))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5))
    # The normalisation statistics travel in the state dict, hence in every checkpoint.
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_channel_mismatch_in_normalisation_is_refused() -> None:
    with pytest.raises(TrainingError, match="channel"):
        build_classifier("fashion_mlp", 10, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
