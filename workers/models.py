"""Models, built by name from the config."""

from __future__ import annotations

from torch import nn

from workers.config import ModelConfig


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.name == "small_cnn":
        return SmallCNN(num_classes)
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
