import pytest
from diffusers import UNet2DConditionModel

from conftest import SD21_SHAPED_UNET, TINY_UNET
from ldm.errors import ConfigError
from ldm.unet import UNetConfig


def test_a_full_diffusers_config_reads_in_and_round_trips():
    full = dict(UNet2DConditionModel(**SD21_SHAPED_UNET).config)  # every diffusers field, defaults included
    config = UNetConfig.from_diffusers(full)
    assert config.attention_head_dim == (2, 4, 4, 4) and config.use_linear_projection and config.upcast_attention
    assert [config.heads(i) for i in range(4)] == [2, 4, 4, 4]
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config


def test_attention_head_dim_counts_heads_as_in_sd_configs():
    config = UNetConfig.from_diffusers(TINY_UNET)
    assert config.heads(0) == config.heads(1) == 2


@pytest.mark.parametrize(
    "field, value",
    [
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 1000),
        ("time_cond_proj_dim", 256),
        ("dual_cross_attention", True),
    ],
)
def test_unsupported_diffusers_fields_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r} is not supported"):
        UNetConfig.from_diffusers({**TINY_UNET, field: value})


def test_unsupported_field_at_its_default_is_accepted_also_as_a_per_block_list():
    config = UNetConfig.from_diffusers({**TINY_UNET, "only_cross_attention": [False, False], "dropout": 0.0})
    assert config == UNetConfig.from_diffusers(TINY_UNET)


def test_unknown_field_is_refused_by_name():
    with pytest.raises(ConfigError, match="unknown field 'attention_heads'"):
        UNetConfig.from_diffusers({**TINY_UNET, "attention_heads": 4})


def test_other_model_class_is_refused():
    with pytest.raises(ConfigError, match="_class_name='UNet2DModel'"):
        UNetConfig.from_diffusers({**TINY_UNET, "_class_name": "UNet2DModel"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_head_dim": [2, 2, 2]}, "attention_head_dim=.*needs 1 or 2 entries"),
        ({"attention_head_dim": 3}, "3 heads do not divide block 0's 8 channels"),
        ({"norm_num_groups": 3}, "block_out_channels=.*not divisible by norm_num_groups=3"),
        ({"down_block_types": ["DownBlock2D", "AttnDownBlock2D"]}, "'AttnDownBlock2D' is not one of"),
        ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "must mirror down_block_types"),
        ({"up_block_types": ["UpBlock2D"]}, "up_block_types=.*needs 2 entries"),
        ({"layers_per_block": 0}, "layers_per_block=0: must be at least 1"),
        ({"transformer_layers_per_block": [1, 2, 3]}, "transformer_layers_per_block=.*needs 1 or 2 entries"),
        ({"transformer_layers_per_block": [[1], [2]]}, "must be a whole number of at least 1, or one per block"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text': only 'text_time'"),
        ({"addition_embed_type": "text_time"}, "both set exactly when addition_embed_type is 'text_time'"),
        ({"addition_time_embed_dim": 8}, "both set exactly when addition_embed_type is 'text_time'"),
    ],
)
def test_inconsistent_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        UNetConfig.from_diffusers({**TINY_UNET, **change})
