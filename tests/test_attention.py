import math

import pytest
import torch

from ldm.attention import Attention, capture_attention_probs, merge_heads, split_heads


def naive_attention(attn: Attention, x, context=None, mask=None):
    """softmax(Q Kᵀ / √d) V per head, written out with no SDPA."""
    context = x if context is None else context
    q, k, v = (split_heads(t, attn.heads) for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
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


def test_key_padding_mask_hides_padded_tokens():
    attn = Attention(dim=16, heads=2, head_dim=8, context_dim=24).eval()
    x, text = torch.randn(2, 9, 16), torch.randn(2, 5, 24)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    out = attn(x, text, mask=mask)
    torch.testing.assert_close(out, naive_attention(attn, x, text, mask))
    # The padded tokens have no influence: changing them changes nothing for the first sample.
    text_changed = text.clone()
    text_changed[0, 3:] = torch.randn(2, 24)
    torch.testing.assert_close(attn(x, text_changed, mask=mask)[0], out[0])
    assert not torch.allclose(attn(x, text_changed)[0], attn(x, text)[0])


def test_self_attention_mask_on_own_tokens():
    attn = Attention(dim=16, heads=2, head_dim=8).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    torch.testing.assert_close(attn(x, mask=mask), naive_attention(attn, x, mask=mask))


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
    mask = torch.tensor([[True] * 4 + [False] * 2] * 3)
    plain = model["cross"](x, text, mask=mask)
    captured = []
    with capture_attention_probs(model, lambda name, probs: captured.append((name, probs))):
        model["self"](x)
        with_capture = model["cross"](x, text, mask=mask)
    assert [name for name, _ in captured] == ["cross"]
    probs = captured[0][1]
    assert probs.shape == (3, 2, 10, 6)  # (batch, heads, pixels, tokens)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 10))
    assert (probs[..., 4:] == 0).all()  # padding gets no attention
    torch.testing.assert_close(with_capture, plain)
    assert model["cross"].probs_sink is None  # off again after the block
