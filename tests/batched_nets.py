"""The two few-shot nets of the Reptile paper, for the batched-mode tests and benchmark.

Stand-ins until ``reptile_fused.models`` (issue 6) lands; ``omniglot_net`` and
``miniimagenet_net`` follow the architectures named in issue 5.
"""

from __future__ import annotations

from torch import nn


def omniglot_net(
    ways: int = 5, channels: int = 64, track_running_stats: bool = False, conv_bias: bool = True
) -> nn.Sequential:
    """4 × [conv 3×3 stride 2 padding 1, BatchNorm2d, ReLU] + linear, for 1×28×28 inputs.

    ``conv_bias=False`` drops the conv biases, whose gradient BatchNorm makes exactly zero
    (in exact arithmetic: what remains is rounding noise, which Adam would amplify to ±lr).
    """
    layers: list[nn.Module] = []
    c = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(c, channels, 3, stride=2, padding=1, bias=conv_bias),
            nn.BatchNorm2d(channels, track_running_stats=track_running_stats),
            nn.ReLU(),
        ]
        c = channels
    # 28 -> 14 -> 7 -> 4 -> 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 2 * 2, ways))


def miniimagenet_net(ways: int = 5, channels: int = 32, size: int = 84) -> nn.Sequential:
    """4 × [conv 3×3 padding 1, BatchNorm2d, 2×2 max-pool, ReLU] + linear, for 3×size×size inputs."""
    layers: list[nn.Module] = []
    c = 3
    for _ in range(4):
        layers += [
            nn.Conv2d(c, channels, 3, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.MaxPool2d(2),
            nn.ReLU(),
        ]
        c = channels
        size //= 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, ways))
