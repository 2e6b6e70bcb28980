"""DALL-E's dVAE checkpoints: OpenAI's released encoder / decoder state dicts <-> vlfast.models.DiscreteVAE.

OpenAI's modules name their convolutions' tensors ".w" / ".b":
    encoder.blocks.input                          7x7 input convolution
    encoder.blocks.group_{g}.block_{i}.id_path    1x1 (where the width changes)
    encoder.blocks.group_{g}.block_{i}.res_path.conv_{1..4}
    encoder.blocks.output.conv                    1x1 to the vocabulary's logits
    decoder.blocks.input                          1x1 from the vocabulary: here the Gumbel quantizer's codebook
                                                  (its weight transposed) and decoder_bias
    decoder.blocks.group_{g}.block_{i}.{id_path, res_path.conv_{1..4}}, decoder.blocks.output.conv
The released files (encoder.pkl, decoder.pkl) are pickled modules, and vlfast never unpickles code: where you
trust them, load them in an environment with OpenAI's dall_e package and re-save the weights,
    torch.save / safetensors.torch.save_file({f"encoder.{k}": v for k, v in enc.state_dict().items()}
                                             | {f"decoder.{k}": v for k, v in dec.state_dict().items()}, path)
then read that file here.
"""
from __future__ import annotations

import torch

from ..models.dvae import DiscreteVAE, DiscreteVAEConfig
from .checkpoint import CheckpointError, Source, Transposed, convert, export, read_state_dict

GROUPS = 4


def _block_index(group: int, block: int, per_group: int) -> int:
    """A block's index in vlfast's flat Sequential of groups (a pool / upsample layer after each group but
    the last)."""
    return group * (per_group + 1) + block


def key_map(config: DiscreteVAEConfig) -> dict:
    """{vlfast key: OpenAI key or Transposed(key)} (the decoder's input weight squeezed to 2-D first)."""
    if config.quantizer != "gumbel":
        raise ValueError("OpenAI's dVAE is the Gumbel model: config.quantizer must be 'gumbel'")
    out = {"encoder.0.weight": "encoder.blocks.input.w", "encoder.0.bias": "encoder.blocks.input.b",
           "encoder.3.weight": "encoder.blocks.output.conv.w", "encoder.3.bias": "encoder.blocks.output.conv.b",
           "quantizer.codebook": Transposed("decoder.blocks.input.w"), "decoder_bias": "decoder.blocks.input.b",
           "decoder.2.weight": "decoder.blocks.output.conv.w", "decoder.2.bias": "decoder.blocks.output.conv.b"}
    n = config.blocks_per_group
    width = {"encoder": [config.n_hid * m for m in (1, 2, 4, 8)]}
    width["decoder"] = width["encoder"][::-1]
    previous = {"encoder": config.n_hid, "decoder": config.n_init}
    groups = {"encoder": "encoder.1", "decoder": "decoder.0"}
    for part in ("encoder", "decoder"):
        n_in = previous[part]
        for g in range(GROUPS):
            for i in range(n):
                ours = f"{groups[part]}.{_block_index(g, i, n)}"
                theirs = f"{part}.blocks.group_{g + 1}.block_{i + 1}"
                block_in = n_in if i == 0 else width[part][g]
                names = ["id_path"] if block_in != width[part][g] else []
                for j, conv in enumerate(("conv_1", "conv_2", "conv_3", "conv_4")):
                    out[f"{ours}.res_path.{2 * j + 1}.weight"] = f"{theirs}.res_path.{conv}.w"
                    out[f"{ours}.res_path.{2 * j + 1}.bias"] = f"{theirs}.res_path.{conv}.b"
                for name in names:
                    out[f"{ours}.{name}.weight"] = f"{theirs}.{name}.w"
                    out[f"{ours}.{name}.bias"] = f"{theirs}.{name}.b"
            n_in = width[part][g]
    return out


def _shapes(config: DiscreteVAEConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DiscreteVAE(config).state_dict().items()}


def dvae_from_openai(source: Source, config: DiscreteVAEConfig = None, *, dtype: torch.dtype = torch.float32) -> DiscreteVAE:
    """A vlfast DiscreteVAE from OpenAI's dVAE weights (one state dict with "encoder." and "decoder." keys; see
    the module docstring). config: sizes that match the weights (default: OpenAI's released model)."""
    config = config or DiscreteVAEConfig()
    state = dict(read_state_dict(source))
    key = "decoder.blocks.input.w"
    if key in state and state[key].dim() == 4:  # a 1x1 convolution (n_init, vocab, 1, 1) -> (n_init, vocab)
        if state[key].shape[2:] != (1, 1):
            raise CheckpointError(f"{key} must be a 1x1 convolution, got shape {tuple(state[key].shape)}")
        state[key] = state[key][:, :, 0, 0]
    converted = convert(state, key_map(config), _shapes(config),
                        "this OpenAI-layout dVAE checkpoint does not fit the config")
    model = DiscreteVAE(config).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=False)
    missing = set(model.state_dict()) - set(converted)
    if missing:
        raise CheckpointError("internal key map error", sorted(missing))
    return model


def dvae_to_openai(model: DiscreteVAE) -> dict:
    """vlfast's weights under OpenAI's keys, the decoder's input as its 1x1 convolution."""
    state = export(model.state_dict(), key_map(model.config))
    key = "decoder.blocks.input.w"
    state[key] = state[key][:, :, None, None].contiguous()
    return state
