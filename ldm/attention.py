"""Multi-head attention, the one module behind both self-attention and cross-attention.

Self-attention: image tokens attend to each other. Cross-attention: image tokens are the
queries and the text encoder's token embeddings are the keys and values, so each pixel
mixes in the words it matches best: softmax(Q Kᵀ / √d) V.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

ProbsSink = Callable[[Tensor], None]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)"""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim)"""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class Attention(nn.Module):
    """Multi-head attention. Given `context` (text embeddings) it is cross-attention:
    image tokens ask, text tokens answer. Without it, the tokens attend to each other.

    `upcast` computes attention in fp32 when the inputs are fp16/bf16 (SD 2.x's
    `upcast_attention`, which keeps the softmax from overflowing at high resolution).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        inner, kv_dim = heads * head_dim, context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # keys read to_out.0.*, as in diffusers
        # Set by `capture_attention_probs`; None means the fused SDPA kernel runs and nothing is kept.
        self.probs_sink: ProbsSink | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (batch, pixels, dim); context: (batch, tokens, context_dim)."""
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)  # (batch, heads, pixels, head_dim)
        k = split_heads(self.to_k(context), self.heads)  # (batch, heads, tokens, head_dim)
        v = split_heads(self.to_v(context), self.heads)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        if self.probs_sink is None:
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √head_dim) v
        else:
            probs = attention_probs(q, k)
            self.probs_sink(probs)
            out = probs @ v
        return self.to_out(merge_heads(out.to(dtype)))


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q kᵀ / √head_dim) written out: (batch, heads, queries, keys), rows sum to 1."""
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1)


@contextmanager
def capture_attention_probs(model: nn.Module, sink: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Inside the block, every cross-attention layer of `model` calls `sink(layer_name, probs)`
    with its (batch, heads, pixels, tokens) probabilities: the raw material of attention maps. A
    capture inside another takes its place until it ends."""
    layers = {
        name: module for name, module in model.named_modules() if isinstance(module, Attention) and module.is_cross
    }
    outer = {name: layer.probs_sink for name, layer in layers.items()}  # a capture this one interrupts
    for name, layer in layers.items():
        layer.probs_sink = lambda probs, name=name: sink(name, probs)
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.probs_sink = outer[name]


def layer_size(latent_size: tuple[int, int], pixels: int) -> tuple[int, int]:
    """The (h, w) of a UNet level with `pixels` positions: each level halves the sides, rounding up."""
    height, width = latent_size
    while height * width > pixels:
        height, width = (height + 1) // 2, (width + 1) // 2
    assert height * width == pixels, f"{pixels} positions do not fit a {latent_size} latent"
    return height, width
