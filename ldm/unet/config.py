"""UNetConfig: the fields of diffusers' `UNet2DConditionModel` that the SD 1.x/2.x and SDXL families use.

Field names and defaults are diffusers', so a `unet/config.json` from any of these models
reads in as it is and the config we write reads back in diffusers. A diffusers field that
changes the architecture in a way we do not build is refused by name, never ignored.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any

from ldm.errors import ConfigError

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Diffusers fields we accept only at the value every SD 1.x/2.x and SDXL UNet has.
FIXED_FIELDS: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the denoising UNet. Note the SD quirk: `attention_head_dim` holds the
    number of heads per block (one int for all blocks, or one per block); `heads()` translates."""

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool | None = False  # SDXL's config says null: no upcast
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks per spatial transformer
    # SDXL's added conditioning: the pooled text embedding and the size/crop numbers ("time ids"),
    # each number embedded sinusoidally in `addition_time_embed_dim`, concatenated, mapped to the
    # timestep embedding's width by an MLP and added to it.
    addition_embed_type: str | None = None  # None, or "text_time"
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None  # pooled width + time ids x addition_time_embed_dim

    def __post_init__(self) -> None:
        per_block = ("down_block_types", "up_block_types", "block_out_channels", "attention_head_dim")
        for name in (*per_block, "transformer_layers_per_block"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        self._check(
            len(self.down_block_types) == n, "down_block_types", f"needs {n} entries, one per block_out_channels"
        )
        self._check(len(self.up_block_types) == n, "up_block_types", f"needs {n} entries, one per block_out_channels")
        for kind in self.down_block_types:
            self._check(kind in DOWN_BLOCKS, "down_block_types", f"{kind!r} is not one of {DOWN_BLOCKS}")
        for kind in self.up_block_types:
            self._check(kind in UP_BLOCKS, "up_block_types", f"{kind!r} is not one of {UP_BLOCKS}")
        has_attention = [kind.startswith("CrossAttn") for kind in self.down_block_types]
        self._check(
            has_attention[::-1] == [kind.startswith("CrossAttn") for kind in self.up_block_types],
            "up_block_types",
            "must mirror down_block_types (cross-attention at the same resolutions)",
        )
        for name in ("attention_head_dim", "transformer_layers_per_block"):
            if isinstance(getattr(self, name), tuple):
                self._check(len(getattr(self, name)) == n, name, f"needs 1 or {n} entries")
        self._check(
            all(isinstance(self.depth(i), int) and self.depth(i) >= 1 for i in range(n)),
            "transformer_layers_per_block",
            "must be a whole number of at least 1, or one per block",
        )
        self._check(self.addition_embed_type in (None, "text_time"), "addition_embed_type", "only 'text_time' (SDXL)")
        added = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        self._check(
            all(isinstance(v, int) and v > 0 for v in added) if self.addition_embed_type else added == (None, None),
            "projection_class_embeddings_input_dim",
            "goes with addition_time_embed_dim, both set exactly when addition_embed_type is 'text_time'",
        )
        for i, channels in enumerate(self.block_out_channels):
            self._check(
                channels % self.norm_num_groups == 0,
                "block_out_channels",
                f"{channels} is not divisible by norm_num_groups={self.norm_num_groups}",
            )
            self._check(
                channels % self.heads(i) == 0,
                "attention_head_dim",
                f"{self.heads(i)} heads do not divide block {i}'s {channels} channels",
            )
        self._check(self.layers_per_block >= 1, "layers_per_block", "must be at least 1")

    def _check(self, ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"unet config: {name}={getattr(self, name)!r}: {why}")

    def heads(self, block: int) -> int:
        """Attention heads in down block `block` (up blocks mirror it; the mid block uses the last)."""
        if isinstance(self.attention_head_dim, int):
            return self.attention_head_dim
        return self.attention_head_dim[block]

    def depth(self, block: int) -> int:
        """Transformer blocks in each spatial transformer of down block `block` (as for `heads`)."""
        if isinstance(self.transformer_layers_per_block, int):
            return self.transformer_layers_per_block
        return self.transformer_layers_per_block[block]

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """Read a diffusers `UNet2DConditionModel` config.json dict; refuse what we don't build."""
        ours = {f.name for f in fields(cls)}
        kept = {}
        for name, value in config.items():
            if name.startswith("_"):  # _class_name, _diffusers_version, _name_or_path: metadata
                continue
            if name in ours:
                kept[name] = value
            elif name in FIXED_FIELDS:
                if not _same(value, FIXED_FIELDS[name]):
                    raise ConfigError(
                        f"unet config: {name}={value!r} is not supported (SD 1.x/2.x UNets use {FIXED_FIELDS[name]!r})"
                    )
            else:
                raise ConfigError(f"unet config: unknown field {name!r}")
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ConfigError(f"unet config: _class_name={class_name!r}: only UNet2DConditionModel is supported")
        return cls(**kept)

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json that diffusers' `UNet2DConditionModel.from_pretrained` reads."""
        config = {"_class_name": "UNet2DConditionModel", **asdict(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _same(value: Any, expected: Any) -> bool:
    """Diffusers may spell a per-block setting as a list of identical values."""
    if isinstance(value, list):
        return all(_same(v, expected) for v in value)
    return value == expected
