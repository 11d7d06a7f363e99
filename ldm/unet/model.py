"""The denoising UNet: predicts the noise (or v) in noisy latents, given the timestep and the text
(and for SDXL, the pooled text embedding and the image's size and crop, added to the timestep's).

Going down, every layer's output is pushed on a skip stack; going up, every layer pops one and
concatenates it to its input. Cross-attention to the text sits after the ResNet blocks of the
resolutions the config names (CrossAttn*Block2D), and in the middle.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.unet.blocks import Downsample, ResnetBlock, TimestepEmbedding, Upsample, timestep_embedding
from ldm.unet.config import UNetConfig
from ldm.unet.transformer import SpatialTransformer


class DownBlock(nn.Module):
    """`layers` ResNet blocks, each optionally followed by a spatial transformer, then a downsample."""

    def __init__(self, cfg: UNetConfig, index: int, in_channels: int, temb_channels: int):
        super().__init__()
        out_channels = cfg.block_out_channels[index]
        attention = cfg.down_block_types[index] == "CrossAttnDownBlock2D"
        self.resnets = nn.ModuleList(
            ResnetBlock(
                in_channels if i == 0 else out_channels, out_channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps
            )
            for i in range(cfg.layers_per_block)
        )
        self.attentions = nn.ModuleList(
            _spatial_transformer(cfg, out_channels, index) for _ in range(cfg.layers_per_block if attention else 0)
        )
        last = index == len(cfg.block_out_channels) - 1
        self.downsamplers = nn.ModuleList([] if last else [Downsample(out_channels)])

    def forward(self, x: Tensor, temb: Tensor, text: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, text)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`layers + 1` ResNet blocks, each taking one skip from the stack (and optionally followed by
    a spatial transformer), then an upsample."""

    def __init__(self, cfg: UNetConfig, index: int, prev_channels: int, temb_channels: int):
        super().__init__()
        channels = cfg.block_out_channels[::-1]
        out_channels = channels[index]
        # The skips this block pops: its own resolution's, and last the one from the block below it.
        skip_in = channels[min(index + 1, len(channels) - 1)]
        layers = cfg.layers_per_block + 1
        attention = cfg.up_block_types[index] == "CrossAttnUpBlock2D"
        self.resnets = nn.ModuleList(
            ResnetBlock(
                (prev_channels if i == 0 else out_channels) + (skip_in if i == layers - 1 else out_channels),
                out_channels,
                temb_channels,
                cfg.norm_num_groups,
                cfg.norm_eps,
            )
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(
            _spatial_transformer(cfg, out_channels, len(channels) - 1 - index)
            for _ in range(layers if attention else 0)
        )
        last = index == len(channels) - 1
        self.upsamplers = nn.ModuleList([] if last else [Upsample(out_channels)])

    def forward(
        self,
        x: Tensor,
        skips: list[Tensor],
        temb: Tensor,
        text: Tensor,
        out_size: tuple[int, int] | None,
    ) -> Tensor:
        """skips: this block's, in the order its layers take them; out_size: the next block's size."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[i]], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, text)
        for upsample in self.upsamplers:
            x = upsample(x, size=out_size)
        return x


class MidBlock(nn.Module):
    """At the lowest resolution: ResNet, spatial transformer, ResNet."""

    def __init__(self, cfg: UNetConfig, temb_channels: int):
        super().__init__()
        channels = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2)
        )
        self.attentions = nn.ModuleList([_spatial_transformer(cfg, channels, len(cfg.block_out_channels) - 1)])

    def forward(self, x: Tensor, temb: Tensor, text: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, text)
        return self.resnets[1](x, temb)


def _spatial_transformer(cfg: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    """The spatial transformer of the blocks at down level `level` (up blocks mirror it)."""
    return SpatialTransformer(
        channels,
        cfg.heads(level),
        cfg.cross_attention_dim,
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        bool(cfg.upcast_attention),
        cfg.depth(level),
    )


class UNet(nn.Module):
    """noise_pred = unet(noisy_latents, timesteps, text_embeddings[, pooled, time_ids]). State-dict
    compatible with diffusers' UNet2DConditionModel for the SD 1.x/2.x and SDXL families."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        base = cfg.block_out_channels[0]
        temb_channels = add_encoder(self, cfg)
        prev_channels = [cfg.block_out_channels[-1], *cfg.block_out_channels[::-1][:-1]]
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, i, prev_channels[i], temb_channels) for i in range(len(cfg.block_out_channels))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, base, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(base, cfg.out_channels, 3, padding=1)

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor | float,
        text: Tensor,
        pooled: Tensor | None = None,
        time_ids: Tensor | None = None,
        control: tuple[list[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """latents: (batch, in_channels, h, w); timesteps: a number or (batch,); text: (batch, tokens,
        cross_attention_dim) token embeddings. SDXL also takes the pooled text embedding, (batch,
        width), and the time ids, (batch, n): original height and width, crop top and left, target
        height and width (the refiner: an aesthetic score in place of the target size). `control`:
        ControlNets' residuals, added to the skips and the mid block's output."""
        temb = embed_time(self, self.config, latents, timesteps, pooled, time_ids)
        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._run(block, x, temb, text)
            skips.extend(block_skips)
        x = self._run(self.mid_block, x, temb, text)
        if control is not None:  # a ControlNet's residuals (ldm/controlnet.py), one per skip and the mid output
            down, mid = control
            skips, x = [skip + residual for skip, residual in zip(skips, down, strict=True)], x + mid
        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]  # last in, first out
            out_size = tuple(skips[-1].shape[-2:]) if skips else None  # the next block's skips set the size
            x = self._run(block, x, block_skips, temb, text, out_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _run(self, block: nn.Module, *inputs):
        return run_block(self, block, *inputs)


def run_block(model: nn.Module, block: nn.Module, *inputs):
    """Run one of `model`'s blocks (a UNet's or a ControlNet's); when it trains with gradient
    checkpointing, keep only the block's inputs and recompute its activations in the backward pass
    (less memory, about 30% more time)."""
    if model.gradient_checkpointing and model.training:
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


def embed_time(
    model: nn.Module, cfg: UNetConfig, latents: Tensor, timesteps: Tensor | float, pooled: Tensor | None,
    time_ids: Tensor | None,
) -> Tensor:  # fmt: skip
    """What every ResNet block of `model` (a UNet or a ControlNet) reads: its time_embedding of the
    timestep, plus for SDXL its add_embedding of [pooled, emb(id_1), ..., emb(id_n)], each size or
    crop number embedded like a timestep."""
    timesteps = torch.as_tensor(timesteps, device=latents.device).expand(latents.shape[0])
    temb = model.time_embedding(timestep_embedding(timesteps, cfg.block_out_channels[0]).to(latents.dtype))
    if cfg.addition_embed_type != "text_time":
        return temb
    if pooled is None or time_ids is None:
        raise ValueError("this UNet (addition_embed_type 'text_time') needs pooled and time_ids")
    ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim)
    added = torch.cat([pooled, ids.reshape(pooled.shape[0], -1)], dim=-1)  # promoted, as diffusers does
    return temb + model.add_embedding(added.to(temb.dtype))


def add_encoder(model: nn.Module, cfg: UNetConfig) -> int:
    """The parts a UNet and a ControlNet share, set on `model` under diffusers' names: the time
    embedding (and SDXL's added one), conv_in, the down blocks and the mid block. Returns the time
    embedding's width, which every ResNet block reads."""
    base = cfg.block_out_channels[0]
    temb_channels = base * 4
    model.time_embedding = TimestepEmbedding(base, temb_channels)
    if cfg.addition_embed_type == "text_time":  # SDXL
        model.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_channels)
    model.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
    in_channels = [base, *cfg.block_out_channels[:-1]]
    model.down_blocks = nn.ModuleList(
        DownBlock(cfg, i, in_channels[i], temb_channels) for i in range(len(cfg.block_out_channels))
    )
    model.mid_block = MidBlock(cfg, temb_channels)
    return temb_channels
