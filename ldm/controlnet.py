"""ControlNet (Zhang, Rao and Agrawala, 2023): a trainable copy of the UNet's encoder that reads a
control image (edges, depth, a layout) and adds what it sees to the UNet's skip connections.

    control image -> ConditioningEmbedding (small convs, down to latent size) --+
    noisy latents -> conv_in ------------------------------------------------ + -> down blocks -> mid block
                                                   every skip, and the mid output, through a zero-initialised
                                                   1x1 conv ("zero conv"), times the scale -> added to the UNet's

The zero convs make a new ControlNet a no-op, so training starts from the base model's behaviour.
State-dict compatible with diffusers' ControlNetModel (SD 1.x/2.x and SDXL); the down and mid
blocks are the UNet's own (ldm/unet/model.py).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import Tensor, nn

from ldm.errors import ConfigError
from ldm.files import OutputExists, writing
from ldm.model import WEIGHTS_FILE, ModelLoadError, load_exactly, read_json, read_weights, save_safetensors
from ldm.single_file import read_state_dict, unet_key
from ldm.unet import UNet, UNetConfig
from ldm.unet.model import add_encoder, embed_time, run_block

CONFIG_FILE = "config.json"
ORIGINAL_PREFIX = "control_model."  # the original files' keys (ControlNet's cldm.py names the module so)


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder's architecture: the base UNet's (its up blocks are not built)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "ControlNetConfig":
        """Read a diffusers ControlNetModel config.json dict; refuse what we do not build."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        order = config.pop("controlnet_conditioning_channel_order", "rgb")
        if order != "rgb":
            raise ConfigError(f"controlnet config: controlnet_conditioning_channel_order={order!r}: only 'rgb'")
        if config.pop("global_pool_conditions", False):
            raise ConfigError("controlnet config: global_pool_conditions=true (the shuffle ControlNet) is not built")
        channels = config.pop("conditioning_channels", 3)
        embedding = tuple(config.pop("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels))
        down = config.get("down_block_types", UNetConfig.down_block_types)
        mirrored = ["CrossAttnUpBlock2D" if kind.startswith("CrossAttn") else "UpBlock2D" for kind in down[::-1]]
        return cls(UNetConfig.from_diffusers({**config, "up_block_types": mirrored}), channels, embedding)

    @classmethod
    def from_unet(cls, unet: UNetConfig, downsampling: int = 8) -> "ControlNetConfig":
        """A ControlNet for this UNet and a VAE that downsamples `downsampling` times: the UNet's
        encoder, and diffusers' conditioning embedding with one strided step per halving."""
        steps = downsampling.bit_length() - 1
        if downsampling != 1 << steps or steps >= len(cls.conditioning_embedding_out_channels):
            raise ConfigError(f"controlnet: a VAE downsampling {downsampling}x: 1, 2, 4 or 8 are built")
        return cls(unet, conditioning_embedding_out_channels=cls.conditioning_embedding_out_channels[: steps + 1])

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json diffusers' ControlNetModel.from_pretrained reads."""
        unet = self.unet.to_diffusers()
        for name in ("_class_name", "up_block_types", "out_channels", "sample_size"):
            unet.pop(name)
        return {"_class_name": "ControlNetModel", **unet, "conditioning_channels": self.conditioning_channels,
                "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}  # fmt: skip


class ConditioningEmbedding(nn.Module):
    """The control image (pixels, 0..1) to the latents' size and width: a 3x3 conv, then per step a
    3x3 conv and a strided 3x3 conv (three steps: 8x smaller), SiLU after each, and a zero conv out."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for here, there in zip(channels[:-1], channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(here, here, 3, padding=1))
            self.blocks.append(nn.Conv2d(here, there, 3, padding=1, stride=2))
        self.conv_out = zero(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, image: Tensor) -> Tensor:
        x = F.silu(self.conv_in(image))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """(down residuals, mid residual) = controlnet(latents, timesteps, text, image, scale[, pooled, time_ids]):
    one residual per UNet skip, added there by UNet.forward(..., control=...)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False  # in training, as the UNet's
        unet = cfg.unet
        base = unet.block_out_channels[0]
        add_encoder(self, unet)  # the UNet's: time embedding, conv_in, down and mid blocks
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, base
        )
        skips = [base]  # conv_in's output, then each down block's layers and downsample
        for i, channels in enumerate(unet.block_out_channels):
            skips += [channels] * (unet.layers_per_block + (i < len(unet.block_out_channels) - 1))
        self.controlnet_down_blocks = nn.ModuleList(zero(nn.Conv2d(c, c, 1)) for c in skips)
        self.controlnet_mid_block = zero(nn.Conv2d(unet.block_out_channels[-1], unet.block_out_channels[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNet, downsampling: int = 8) -> "ControlNet":
        """Initialised as the paper and diffusers' ControlNetModel.from_unet do: the UNet's encoder
        weights copied, the conditioning embedding fresh, the zero convs zero. `downsampling`: the
        VAE's (SD's is 8), which the conditioning embedding must match."""
        controlnet = cls(ControlNetConfig.from_unet(unet.config, downsampling))
        shared = {k: v for k, v in unet.state_dict().items() if k in controlnet.state_dict()}
        controlnet.load_state_dict(shared, strict=False)
        return controlnet

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor | float,
        text: Tensor,
        image: Tensor,
        scale: float = 1.0,
        pooled: Tensor | None = None,
        time_ids: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """image: (batch, 3, 8h, 8w) in [0, 1] for (batch, c, h, w) latents."""
        temb = embed_time(self, self.config.unet, latents, timesteps, pooled, time_ids)
        x = self.conv_in(latents) + self.controlnet_cond_embedding(image.to(latents.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = run_block(self, block, x, temb, text)
            skips.extend(block_skips)
        x = run_block(self, self.mid_block, x, temb, text)
        down = [conv(skip) * scale for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(x) * scale

    def save(self, folder: str | Path) -> None:
        """A new diffusers ControlNetModel folder: config.json and the weights (written beside it and
        renamed into place, so never half-written)."""
        folder = Path(folder)
        if folder.exists():
            raise OutputExists(f"{folder} already exists; choose a new folder")
        with writing(folder) as partial:
            partial.mkdir(parents=True)
            (partial / CONFIG_FILE).write_text(json.dumps(self.config.to_diffusers(), indent=2))
            save_safetensors(partial / WEIGHTS_FILE, self.state_dict())

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "ControlNet":
        """A diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)."""
        folder = Path(folder)
        config = read_json(folder / CONFIG_FILE)
        if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise ModelLoadError(f"{folder}: a {config.get('_class_name')} folder, not a ControlNet")
        with init_empty_weights():
            controlnet = cls(ControlNetConfig.from_diffusers(config))
        if not (folder / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"controlnet: no {WEIGHTS_FILE} in {folder}")
        load_exactly(controlnet, read_weights(folder / WEIGHTS_FILE, dtype), "controlnet")
        return controlnet.to(dtype)

    @classmethod
    def load_single_file(cls, path: str | Path, base: UNetConfig, dtype: torch.dtype = torch.float32) -> "ControlNet":
        """An original ControlNet file (`control_v11p_sd15_canny.safetensors`: `control_model.*` keys,
        or none, as lllyasviel's and the web UIs' files have them), for a model whose UNet is `base`:
        the file carries no config, so its architecture is the base UNet's encoder (and the
        conditioning embedding as deep as its `input_hint_block`); a file that does not fit is refused."""
        path = Path(path)
        state = {key.removeprefix(ORIGINAL_PREFIX): value for key, value in read_state_dict(path).items()}
        hint_convs = len({key.split(".")[1] for key in state if key.startswith("input_hint_block.")})
        if not hint_convs or hint_convs % 2:
            raise ModelLoadError(f"{path}: not a ControlNet file (no input_hint_block of conv layers)")
        with init_empty_weights():
            controlnet = cls(ControlNetConfig.from_unet(base, 2 ** ((hint_convs - 2) // 2)))
        names = {original_key(key, controlnet.config): key for key in controlnet.state_dict()}
        known = {names[key]: value.to(dtype) for key, value in state.items() if key in names}
        unknown = sorted(set(state) - set(names))
        if unknown:
            raise ModelLoadError(
                f"{path}: {len(unknown)} weight(s) a ControlNet for this model has not, e.g. {unknown[0]}"
            )
        load_exactly(controlnet, known, "controlnet")
        return controlnet.to(dtype)

    def save_single_file(self, path: str | Path) -> None:
        """The original layout (`control_model.*`), which the web UIs read."""
        state = {ORIGINAL_PREFIX + original_key(k, self.config): v for k, v in self.state_dict().items()}
        save_safetensors(Path(path), state)

    @property
    def downsampling(self) -> int:
        """How many times smaller than the control image the latents are (one halving per step of the
        conditioning embedding): SD's VAE downsamples 8 times."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def fits(self, unet: UNet) -> None:
        """Refuse, in one line, a ControlNet made for another architecture than the UNet's."""
        ours, theirs = self.config.unet, unet.config
        for name in ("block_out_channels", "cross_attention_dim", "addition_embed_type"):
            if getattr(ours, name) != getattr(theirs, name):
                raise ModelLoadError(
                    f"controlnet: made for a UNet with {name}={getattr(ours, name)!r}; this model's is "
                    f"{getattr(theirs, name)!r} (a ControlNet for another model family?)"
                )


def original_key(key: str, config: ControlNetConfig) -> str:
    """Our (diffusers') key -> the original ControlNet's: the UNet encoder's as the CompVis UNet names
    them, the conditioning embedding as `input_hint_block.N` (its convs at even indices, SiLUs
    between), each zero conv `zero_convs.N.0`, the mid one `middle_block_out.0`."""
    part, _, rest = key.partition(".")
    if part == "controlnet_cond_embedding":
        layer, _, tail = rest.partition(".")
        blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
        if layer == "blocks":
            index, _, tail = tail.partition(".")
            return f"input_hint_block.{2 * int(index) + 2}.{tail}"
        return f"input_hint_block.{0 if layer == 'conv_in' else 2 * blocks + 2}.{tail}"
    if part == "controlnet_down_blocks":
        index, _, tail = rest.partition(".")
        return f"zero_convs.{index}.0.{tail}"
    if part == "controlnet_mid_block":
        return f"middle_block_out.0.{rest}"
    return unet_key(key, config.unet)
