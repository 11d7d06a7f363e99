"""A model's architecture and parameter counts per part, as text (`python -m commands.describe`)."""

from torch import nn

from ldm.autoencoder import downsampling_factor
from ldm.model import LatentDiffusion


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: LatentDiffusion) -> str:
    """A table a person reads: one line per part, and the UNet block by block."""
    unet, vae, scheduler = model.unet.config, model.vae.config, model.scheduler.config
    tokenizers = {"text_encoder": model.tokenizer, "text_encoder_2": model.tokenizer_2}
    lines = [
        f"{name:14}{count(encoder):>14,}  {type(encoder).__name__}: {text.num_hidden_layers} layers, "
        f"width {text.hidden_size}, {text.num_attention_heads} heads, {text.max_position_embeddings} tokens, "
        f"vocab {tokenizers[name].vocab_size:,} (pad {tokenizers[name].pad_token!r})"
        for name, encoder in model.text_parts().items()
        for text in [encoder.config]
    ]
    added = "size/crop/aesthetic score" if model.is_refiner else "size/crop"
    lines.append(
        f"{'unet':14}{count(model.unet):>14,}  UNet: {unet.in_channels} -> {unet.out_channels} channels, "
        f"cross-attention to {unet.cross_attention_dim}-wide text, "
        f"{'linear' if unet.use_linear_projection else 'conv'} projections"
        f"{', fp32 attention' if unet.upcast_attention else ''}"
        + (f", pooled text and {added} added to the timestep" if unet.addition_embed_type else "")
    )
    stages = [(f"down {i}", block, i) for i, block in enumerate(model.unet.down_blocks)]
    stages.append(("mid", model.unet.mid_block, len(model.unet.down_blocks) - 1))
    depth = len(model.unet.down_blocks) - 1
    stages += [(f"up {i}", block, depth - i) for i, block in enumerate(model.unet.up_blocks)]
    for name, block, level in stages:
        attention = (
            f"cross-attention {unet.heads(level)} heads x {unet.block_out_channels[level] // unet.heads(level)}"
            + (f", {unet.depth(level)} transformer blocks deep" if unet.depth(level) > 1 else "")
            if len(block.attentions)
            else "no attention"
        )
        lines.append(
            f"  {name:12}{count(block):>14,}  {len(block.resnets)} resnet(s), "
            f"{unet.block_out_channels[level]} channels at 1/{2**level} of the latent size, {attention}"
        )
    lines += [
        f"{'vae':14}{count(model.vae):>14,}  AutoencoderKL: {vae.in_channels} -> {vae.latent_channels} latent "
        "channels, "
        f"{downsampling_factor(model.vae)}x downsampling, channels {list(vae.block_out_channels)}, "
        f"latents scaled by {vae.scaling_factor}",
        f"{'scheduler':14}{'':>14}  {type(model.scheduler).__name__}: {scheduler.num_train_timesteps} steps, "
        f"{scheduler.beta_schedule} betas, predicts {scheduler.prediction_type}",
        f"{'total':14}{sum(count(part) for part in model.parts().values()):>14,}",
    ]
    return "\n".join(lines)
