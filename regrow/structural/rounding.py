"""Rounding kept channel counts to the widths the device's dense kernels run fastest at.

Default rounding: kept widths of groups with at least ROUND_MIN_CHANNELS channels become multiples of the
channel block of the device's fastest dense kernels (auto_round_to). On CPUs oneDNN stores activations in
blocks of 16 channels with AVX-512 and of 8 with AVX2, so a width between two multiples costs as much as the
next one up: on an AVX-512 CPU, 3x3 convs at 14x14 took as long with 24 channels as with 32, with 40 as with
48. benchmarks/structural_speed.py times the rounding side by side on the reference ResNet at half the MACs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from regrow.structural.graph import ChannelGroup

AUTO_ROUND_TO = 8
ROUND_MIN_CHANNELS = 32


def auto_round_to(device: torch.device | str | None = None) -> int:
    """The default ``round_to`` for a model on ``device``: 16 on CPUs with AVX-512, else 8."""
    if device is not None:
        device = torch.device(device)
    if device is None or device.type == "cpu":
        capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
        if str(capability).upper().startswith("AVX512"):
            return 16
    return AUTO_ROUND_TO


def _round_step(group: ChannelGroup, round_to: int | None, auto: int, round_widths: dict[str, int] | None) -> int:
    """Kept units of ``group`` must be a multiple of this: ``round_to`` if given, else ``auto`` for groups of
    at least ROUND_MIN_CHANNELS channels (measured by ``round_widths`` when given) and no rounding for others."""
    width = (round_widths or {}).get(group.name, group.channels)
    multiple = round_to if round_to is not None else (auto if width >= ROUND_MIN_CHANNELS else 1)
    return multiple // math.gcd(multiple, group.unit_size)


def _width_warnings(
    model: nn.Module, round_to: int | None, pattern: str, before: dict[str, int], auto: int = AUTO_ROUND_TO
) -> list[str]:
    """Layers that the prune left at a width that is not a multiple of 8 (and that were multiples before)."""
    if pattern not in ("channel", "channel+head") or (round_to is not None and round_to % 8 == 0):
        return []
    odd = []
    for name, m in model.named_modules():
        width = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        was = before.get(name, 0)
        # Narrow layers are not rounded by default: no point nagging about them.
        wide = was >= ROUND_MIN_CHANNELS or round_to is not None
        if (
            isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and width
            and width % 8
            and was % 8 == 0
            and wide
        ):
            odd.append(f"{name} ({width})")
    if not odd:
        return []
    shown = ", ".join(odd[:6]) + (f" and {len(odd) - 6} more" if len(odd) > 6 else "")
    return [
        f"layer widths that are not multiples of 8 run slower on most hardware: {shown}; pass round_to={auto} "
        "(the channel block of this device's dense kernels)."
    ]


def _widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer, by module name."""
    return {
        name: getattr(m, "out_channels", None) or getattr(m, "out_features", 0)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    }
