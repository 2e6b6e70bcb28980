"""vlfast.loaders.dvae_from_openai on a randomly initialised state dict in OpenAI's layout, written here
from the released model's module names (not from vlfast's key map)."""
import pytest
import torch

from vlfast.loaders import CheckpointError, dvae_from_openai, dvae_to_openai
from vlfast.models import DiscreteVAEConfig

CONFIG = DiscreteVAEConfig(image_size=32, n_hid=16, vocab_size=64, n_init=16, blocks_per_group=2)


def _openai_state(seed=0):
    """OpenAI's names: {encoder,decoder}.blocks.{input, group_g.block_i.{id_path, res_path.conv_1..4}, output.conv}."""
    g = torch.Generator().manual_seed(seed)
    h, k, init = 16, 64, 16
    state = {}

    def conv(name, n_in, n_out, kw):
        state[f"{name}.w"] = torch.randn(n_out, n_in, kw, kw, generator=g) * 0.1
        state[f"{name}.b"] = torch.randn(n_out, generator=g) * 0.1

    def blocks(part, widths, n_in, kernels):
        for gi, width in enumerate(widths, start=1):
            for bi in (1, 2):
                name = f"{part}.blocks.group_{gi}.block_{bi}"
                block_in = n_in if bi == 1 else width
                if block_in != width:
                    conv(f"{name}.id_path", block_in, width, 1)
                sizes = [block_in, width // 4, width // 4, width // 4, width]
                for c, kw in enumerate(kernels, start=1):
                    conv(f"{name}.res_path.conv_{c}", sizes[c - 1], sizes[c], kw)
            n_in = width

    conv("encoder.blocks.input", 3, h, 7)
    blocks("encoder", [h, 2 * h, 4 * h, 8 * h], h, (3, 3, 3, 1))
    conv("encoder.blocks.output.conv", 8 * h, k, 1)
    conv("decoder.blocks.input", k, init, 1)
    blocks("decoder", [8 * h, 4 * h, 2 * h, h], init, (1, 3, 3, 3))
    conv("decoder.blocks.output.conv", h, 6, 1)
    return state


def test_every_tensor_lands_where_the_architecture_puts_it():
    state = _openai_state()
    model = dvae_from_openai(state, CONFIG)
    assert torch.equal(model.encoder[0].weight, state["encoder.blocks.input.w"])
    assert torch.equal(model.encoder[3].weight, state["encoder.blocks.output.conv.w"])
    # group 2's first block (after group 1's two blocks and a pool) widens 16 -> 32 through its id path
    assert torch.equal(model.encoder[1][3].id_path.weight, state["encoder.blocks.group_2.block_1.id_path.w"])
    assert torch.equal(model.decoder[0][4].res_path[7].bias, state["decoder.blocks.group_2.block_2.res_path.conv_4.b"])
    torch.testing.assert_close(model.quantizer.codebook, state["decoder.blocks.input.w"][:, :, 0, 0].T)
    assert torch.equal(model.decoder_bias, state["decoder.blocks.input.b"])
    back = dvae_to_openai(model)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_decoding_one_hot_tokens_is_openais_input_convolution():
    """decode(tokens) feeds the decoder what OpenAI's 1x1 input convolution makes of one-hot tokens."""
    state = _openai_state(1)
    model = dvae_from_openai(state, CONFIG).eval()
    tokens = torch.randint(0, 64, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(tokens, 64).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.conv2d(one_hot, state["decoder.blocks.input.w"], state["decoder.blocks.input.b"])
    want = torch.sigmoid(model.decoder(x).chunk(2, dim=1)[0])
    torch.testing.assert_close(model.decode(tokens), ((want - 0.1) / 0.8).clamp(0, 1))


def test_missing_and_misshaped_keys_are_listed():
    state = _openai_state()
    del state["encoder.blocks.group_3.block_2.res_path.conv_2.w"]
    state["decoder.blocks.output.conv.w"] = torch.zeros(6, 15, 1, 1)
    with pytest.raises(CheckpointError) as err:
        dvae_from_openai(state, CONFIG)
    text = str(err.value)
    assert "encoder.blocks.group_3.block_2.res_path.conv_2.w" in text and "(6, 15, 1, 1)" in text
    with pytest.raises(ValueError, match="quantizer must be 'gumbel'"):
        dvae_from_openai(_openai_state(), DiscreteVAEConfig(**{**CONFIG.__dict__, "quantizer": "vq"}))
