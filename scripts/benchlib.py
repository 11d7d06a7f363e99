"""What the benchmark scripts share: a preset's UNet, whole or at a quarter of the width for a CPU."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.model import read_preset  # noqa: E402
from ldm.unet import UNetConfig  # noqa: E402


def unet_config(preset: str, reduced: bool) -> UNetConfig:
    """The preset's UNet; `reduced`: the same blocks, heads and depths, a quarter of the channels."""
    spec = read_preset(preset)["unet"]
    if reduced:
        spec["block_out_channels"] = [c // 4 for c in spec["block_out_channels"]]
        spec["norm_num_groups"] = 16  # 80 channels: groups of 5
    return UNetConfig.from_diffusers(spec)
