"""Image models: ResNet and VGG for small inputs (CIFAR-sized and smaller), with GroupNorm.

The architectures are torchvision's (``resnet18``/``34`` BasicBlocks; VGG configurations A, B, D, E),
adapted as is usual for 32x32 inputs: a 3x3 stride-1 stem and no max-pool for ResNet, and VGG's
pools skipped once the feature map is 1x1 (so 8x8 digits work too). Two changes, for reasons of this
runtime:

- **GroupNorm instead of BatchNorm.** BatchNorm normalises by the statistics of the rows one rank
  holds, so a step's gradient would depend on how its samples are split over the ranks, and N ranks
  would not train the model of 1 rank; its running statistics are also state outside the gradient
  that a recovered or joining rank would have to get. GroupNorm normalises each sample on its own.
- **No torchvision import.** torchvision's PyPI wheel (0.28.0, for torch 2.13.0) does not load next to
  the CPU build of torch (``operator torchvision::nms does not exist``), and its definitions hard-code
  BatchNorm's placement; these are a few dozen lines.

Inputs are rows of a dense data set: uint8 pixels (H, W, 3) from ``prepare images``/``cifar`` (scaled
to [0, 1] here) or float rows (H, W) such as digits (one channel). ``mean``/``std`` in the spec
(``--normalize``) standardise each channel.
"""

import math

import torch
from torch import nn

RESNET_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
VGG_LAYERS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
DEPTHS = {"resnet": tuple(RESNET_BLOCKS), "vgg": tuple(VGG_LAYERS)}


def norm(channels):
    # Groups of at least 4 channels (32 groups from 128 channels on): with one channel a group
    # (InstanceNorm), each channel's mean, hence an image's colour, would be normalised away.
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


class Pixels(nn.Module):
    """Rows (N, H, W[, C]) of uint8 or float -> float (N, C, H, W), scaled and standardised."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        # Not persistent: fixed by the spec, so neither checkpoints nor the allreduce carry them.
        c = len(mean) if mean is not None else 0
        self.register_buffer("mean", torch.tensor(mean or [], dtype=torch.float32).reshape(1, c, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std or [], dtype=torch.float32).reshape(1, c, 1, 1),
                             persistent=False)

    def forward(self, X):
        x = X.float() / 255.0 if X.dtype == torch.uint8 else X.float()
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        if self.mean.numel():
            x = (x - self.mean) / self.std
        return x


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.n1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.n2 = norm(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x):
        out = torch.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self, depth, width, in_channels, n_classes, mean=None, std=None):
        super().__init__()
        self.pixels = Pixels(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm(width), nn.ReLU())
        layers, c = [], width
        for i, n in enumerate(RESNET_BLOCKS[depth]):
            out = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(c, out, 2 if (i and not j) else 1))
                c = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, X):
        x = self.layers(self.stem(self.pixels(X)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    def __init__(self, depth, width, in_channels, n_classes, size, mean=None, std=None):
        super().__init__()
        self.pixels = Pixels(mean, std)
        body, c, side = [], in_channels, min(size)
        for i, n in enumerate(VGG_LAYERS[depth]):
            out = width * 2 ** min(i, 3)  # 64, 128, 256, 512, 512 at width 64
            for _ in range(n):
                body += [nn.Conv2d(c, out, 3, padding=1), norm(out), nn.ReLU()]
                c = out
            if side > 1:
                body.append(nn.MaxPool2d(2))
                side //= 2
        self.features = nn.Sequential(*body)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, X):
        x = self.features(self.pixels(X))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(spec):
    shape = [int(s) for s in spec["feature_shape"]]
    channels = shape[2] if len(shape) == 3 else 1
    depth, width, n_out = int(spec["depth"]), int(spec["width"]), int(spec["n_classes"])
    mean, std = spec.get("mean"), spec.get("std")
    if spec["name"] == "resnet":
        return ResNet(depth, width, channels, n_out, mean, std)
    return VGG(depth, width, channels, n_out, shape[:2], mean, std)
