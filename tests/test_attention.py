import math

import pytest
import torch

from ldm.attention import Attention, capture_attention_probs, merge_heads, split_heads


def naive_attention(attn: Attention, x, context=None):
    """softmax(Q Kᵀ / √d) V per head, written out with no SDPA."""
    context = x if context is None else context
    q, k, v = (split_heads(t, attn.heads) for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return attn.to_out(merge_heads(torch.softmax(scores, dim=-1) @ v))


def test_split_and_merge_heads_are_inverse():
    x = torch.randn(2, 5, 12)
    assert split_heads(x, 3).shape == (2, 3, 5, 4)
    torch.testing.assert_close(merge_heads(split_heads(x, 3)), x)


def test_self_attention_is_softmax_qk_v():
    attn = Attention(dim=32, heads=4, head_dim=8).eval()
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(attn(x), naive_attention(attn, x))


def test_cross_attention_is_softmax_qk_v_with_other_length_and_width():
    attn = Attention(dim=32, heads=4, head_dim=6, context_dim=48).eval()
    x, text = torch.randn(2, 16, 32), torch.randn(2, 7, 48)
    out = attn(x, text)
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, naive_attention(attn, x, text))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_computes_attention_in_fp32(dtype):
    attn = Attention(dim=16, heads=2, head_dim=8, context_dim=8, upcast=True).eval()
    x, text = torch.randn(2, 9, 16), torch.randn(2, 4, 8)
    reference = naive_attention(attn, x, text)
    attn.to(dtype)
    out = attn(x.to(dtype), text.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


def test_capture_hands_over_cross_attention_probabilities_only():
    model = torch.nn.ModuleDict({"self": Attention(16, 2, 8), "cross": Attention(16, 2, 8, context_dim=12)}).eval()
    x, text = torch.randn(3, 10, 16), torch.randn(3, 6, 12)
    plain = model["cross"](x, text)
    captured = []
    with capture_attention_probs(model, lambda name, probs: captured.append((name, probs))):
        model["self"](x)
        with_capture = model["cross"](x, text)
    assert [name for name, _ in captured] == ["cross"]
    probs = captured[0][1]
    assert probs.shape == (3, 2, 10, 6)  # (batch, heads, pixels, tokens)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 10))
    torch.testing.assert_close(with_capture, plain)
    assert model["cross"].probs_sink is None  # off again after the block
