"""Models, built by name from the config."""

from __future__ import annotations

from torch import nn

from workers.core.config import ModelConfig


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """`input_shape` is (channels, height, width) of one input, as the dataset gives it (`Splits.input_shape`)."""
    channels, height, _ = input_shape  # every dataset here has square images
    if cfg.name == "small_cnn":
        return SmallCNN(num_classes, in_channels=channels, spatial=height)
    if cfg.name == "cifar_cnn":
        return CifarCNN(num_classes, in_channels=channels, spatial=height)
    if cfg.name == "resnet50":
        return resnet50_small_inputs(num_classes, in_channels=channels)
    raise ValueError(f"model.name={cfg.name!r} is not supported")


class SmallCNN(nn.Module):
    """Two 3x3 conv layers and a two-layer head: ~38k parameters for 8x8 digits."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16, spatial: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (spatial // 2) ** 2, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class CifarCNN(nn.Module):
    """The CNN of PyTorch's CIFAR-10 tutorial and hivemind's CIFAR-10 example: conv(6, 5x5)-pool-conv(16, 5x5)-pool,
    then 120-84-classes; ~62k parameters on 32x32 images."""

    def __init__(self, num_classes: int, in_channels: int = 3, spatial: int = 32):
        super().__init__()
        side = ((spatial - 4) // 2 - 4) // 2  # two unpadded 5x5 convolutions, each followed by a 2x2 pool
        if side < 1:
            raise ValueError(f"model.name='cifar_cnn' needs images of at least 16x16, the dataset's are {spatial}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


def resnet50_small_inputs(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 for 32-64 px images: a 3x3 stride-1 stem and no max-pool, so a 64x64 image reaches
    the last stage at 8x8 instead of 2x2 (the usual adaptation for CIFAR and Tiny ImageNet)."""
    from torchvision.models import resnet50

    model = resnet50(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits conv1
    model.maxpool = nn.Identity()
    return model
