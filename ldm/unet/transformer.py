"""Where the text enters the image: the transformer block and the spatial transformer around it."""

from torch import Tensor, nn

from ldm.attention import Attention
from ldm.unet.blocks import FeedForward


class TransformerBlock(nn.Module):
    """Three pre-norm residual steps: pixels attend to pixels, pixels attend to the text, an MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)  # self-attention
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)  # cross-attention
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=text)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Runs a TransformerBlock over a feature map: normalise, project in, treat each pixel as a
    token, project out, add to the input. SD 1.x projects with 1x1 convs, SD 2.x with Linear
    layers (`linear`); the two are the same map on differently shaped weights. SDXL stacks
    `depth` transformer blocks (up to 10) inside one spatial transformer."""

    def __init__(
        self, channels: int, heads: int, context_dim: int, groups: int, linear: bool, upcast: bool, depth: int = 1
    ):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        # Start as the identity map, so a fresh UNet trains like one without attention at first.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.view(batch, channels, height * width).transpose(1, 2)  # (batch, pixels, channels)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, text)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        if not self.linear:
            h = self.proj_out(h)
        return x + h
