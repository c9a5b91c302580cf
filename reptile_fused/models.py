"""The paper's networks: the Omniglot and Mini-ImageNet conv nets and the sine-wave MLP.

Batch norm always normalises with the statistics of the batch it is given, in
training and evaluation alike (``track_running_stats=False``), as in the paper:
there are no running averages to carry between tasks.  Initialisation and the
batch-norm epsilon follow the authors' TensorFlow defaults (Glorot-uniform weights,
zero biases, eps = 1e-3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BN_EPS = 1e-3


def _halved(size: int, times: int) -> int:
    """Spatial size after ``times`` stride-2 stages that round up (TF 'same' padding)."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


def _glorot_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class _FourStageConvNet(nn.Module):
    """Four ``stage(in_channels, channels)`` blocks, each halving the image (rounding up), then a linear layer."""

    def __init__(self, stage, num_classes: int, in_channels: int, image_size: int, channels: int):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(4):
            layers += stage(c, channels)
            c = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * _halved(image_size, 4) ** 2, num_classes)
        _glorot_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, track_running_stats=False)


class OmniglotNet(_FourStageConvNet):
    """4 x [conv 3x3, 64 channels, stride 2, same padding, batch norm, ReLU] + linear."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 28, channels: int = 64):
        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), _batch_norm(c_out), nn.ReLU()]

        super().__init__(stage, num_classes, in_channels, image_size, channels)


class MiniImageNetNet(_FourStageConvNet):
    """4 x [conv 3x3 (32 channels, same padding), 2x2 max-pool, batch norm, ReLU] + linear.

    The pool sits before the batch norm, as in the code that produced the paper's
    numbers; the pool rounds up (TF 'same'), so 84 -> 42 -> 21 -> 11 -> 6.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 84, channels: int = 32):
        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.MaxPool2d(2, 2, ceil_mode=True), _batch_norm(c_out),
                    nn.ReLU()]

        super().__init__(stage, num_classes, in_channels, image_size, channels)


class SineMLP(nn.Module):
    """1 -> 64 -> 64 -> 1 with tanh, the paper's sine-wave regressor."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MODELS = {"omniglot": OmniglotNet, "miniimagenet": MiniImageNetNet, "sine": SineMLP}


def build_model(spec: dict) -> nn.Module:
    """A model from a plain-dict spec (what checkpoints store): ``{"name": ..., **kwargs}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**spec)


def model_spec(dataset: str, ways: int, image_shape=None, arch: str | None = None) -> dict:
    """The model spec for a dataset: sine -> MLP, images -> the paper's conv net for their size."""
    if dataset == "sine":
        return {"name": "sine"}
    arch = arch or ("omniglot" if dataset == "omniglot" else "miniimagenet")
    if arch not in ("omniglot", "miniimagenet"):
        raise ValueError(f"unknown image model {arch!r}; choose omniglot or miniimagenet")
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    return {"name": arch, "num_classes": ways, "in_channels": c, "image_size": h}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Bit-exact equality of two models' parameters (and buffers)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
