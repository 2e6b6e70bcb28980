"""vlfast.models.DiscreteVAE: DALL-E's dVAE architecture, the logit-Laplace likelihood, both quantizers."""
import math

import pytest
import torch

from vlfast.models.dvae import (DecoderBlock, DiscreteVAE, DiscreteVAEConfig, EncoderBlock, logit_laplace_nll,
                                map_pixels, unmap_pixels)

SMALL = dict(image_size=32, n_hid=16, vocab_size=64, n_init=16)


def test_logit_laplace_is_a_density_on_the_unit_interval():
    """exp(-nll) integrates to 1 over (0, 1) and matches the formula written out in float64."""
    x = torch.linspace(1e-7, 1 - 1e-7, 400001, dtype=torch.float64)
    for mu, log_b in ((0.3, math.log(0.7)), (-1.5, math.log(1.8)), (2.0, 0.0)):
        mu_t, lb_t = torch.full_like(x, mu), torch.full_like(x, log_b)
        pointwise = torch.stack([logit_laplace_nll(xi[None], m[None], lb[None]) for xi, m, lb in
                                 zip(x[::4000], mu_t[::4000], lb_t[::4000])])
        b = math.exp(log_b)
        want = torch.log(2 * b * x[::4000] * (1 - x[::4000])) + (torch.log(x[::4000] / (1 - x[::4000])) - mu).abs() / b
        torch.testing.assert_close(pointwise, want)
        density = torch.exp(-(log_b + torch.log(2 * x * (1 - x)) + (torch.logit(x) - mu).abs() / b))
        assert abs(torch.trapezoid(density, x).item() - 1) < 1e-3


def test_map_and_unmap_pixels():
    x = torch.rand(1000, dtype=torch.float64)
    assert map_pixels(x).min() >= 0.1 and map_pixels(x).max() <= 0.9
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


def test_openai_architecture():
    model = DiscreteVAE(DiscreteVAEConfig(**SMALL, blocks_per_group=2))
    enc = [m for m in model.encoder.modules() if isinstance(m, EncoderBlock)]
    dec = [m for m in model.decoder.modules() if isinstance(m, DecoderBlock)]
    assert len(enc) == len(dec) == 8 and all(m.post_gain == 1 / 64 for m in enc + dec)
    widths = [m.res_path[-1].out_channels for m in enc]
    assert widths == [16, 16, 32, 32, 64, 64, 128, 128] and [m.res_path[-1].out_channels for m in dec] == widths[::-1]
    assert model.encoder[0].kernel_size == (7, 7) and model.encoder[-1].out_channels == 64  # logits over the vocabulary
    assert model.decoder[-1].out_channels == 6  # mu and log-scale per channel


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_shapes_round_trip_and_training_lowers_the_loss(quantizer):
    torch.manual_seed(0)
    model = DiscreteVAE(DiscreteVAEConfig(**SMALL, quantizer=quantizer, kl_weight=0.1))
    x = torch.rand(4, 3, 32, 32) * 0.2 + torch.linspace(0, 0.7, 32)[None, None, None, :]  # a smooth gradient image
    tokens = model.encode(x)
    assert tokens.shape == (4, 4, 4) and tokens.dtype == torch.int64
    out = model.decode(tokens)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        result = model(x)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        first = result.reconstruction.item() if first is None else first
    assert result.reconstruction.item() < first - 0.1
    torch.testing.assert_close(result.loss, result.reconstruction + result.quantizer.loss)


def test_vq_tokens_are_the_exact_nearest_codes():
    model = DiscreteVAE(DiscreteVAEConfig(**SMALL, quantizer="vq"))
    x = torch.rand(2, 3, 32, 32)
    z = model.encoder(map_pixels(x)).permute(0, 2, 3, 1).reshape(-1, 16).double()
    want = torch.cdist(z, model.quantizer.codebook.double()).argmin(dim=1)
    assert torch.equal(model.encode(x).reshape(-1), want)


def test_vq_dead_codes_restart_from_the_batch():
    """dead_code_threshold reaches the VQ quantizer: codes no vector picks restart from encoder outputs."""
    torch.manual_seed(0)
    model = DiscreteVAE(DiscreteVAEConfig(**SMALL, quantizer="vq", dead_code_threshold=1.0)).train()
    assert model.quantizer.dead_code_threshold == 1.0
    x = torch.rand(2, 3, 32, 32)
    before = model.quantizer.codebook.clone()
    with torch.no_grad():
        z = model.encoder(map_pixels(x)).permute(0, 2, 3, 1).reshape(-1, 16)
        model(x)
    restarted = (model.quantizer.codebook != before).any(dim=1) & (torch.cdist(model.quantizer.codebook, z).amin(1) < 1e-5)
    assert restarted.any()  # 32 vectors cannot keep 64 codes alive: some restart at a vector of the batch


def test_dead_code_threshold_is_for_vq_only_and_not_negative():
    with pytest.raises(ValueError, match="dead_code_threshold must be >= 0, and is for quantizer='vq' only"):
        DiscreteVAEConfig(**SMALL, dead_code_threshold=1.0)  # the Gumbel quantizer would ignore it
    with pytest.raises(ValueError, match="dead_code_threshold must be >= 0"):
        DiscreteVAEConfig(**SMALL, quantizer="vq", dead_code_threshold=-1.0)


def test_gumbel_loss_is_the_evidence_lower_bound_and_eval_is_deterministic():
    model = DiscreteVAE(DiscreteVAEConfig(**SMALL, kl_weight=2.0)).eval()
    x = torch.rand(2, 3, 32, 32)
    a, b = model(x), model(x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.loss, b.loss)
    logits = model.encoder(map_pixels(x)).permute(0, 2, 3, 1).reshape(-1, 64).double()
    log_q = logits.log_softmax(-1)
    kl = (log_q.exp() * (log_q + math.log(64))).sum(-1).mean()
    torch.testing.assert_close(a.quantizer.loss.double(), 2.0 * kl, rtol=1e-5, atol=1e-7)
    assert torch.equal(model.encode(x), logits.argmax(-1).view(2, 4, 4))


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of the encoder's downsampling"):
        DiscreteVAEConfig(image_size=36)
    with pytest.raises(ValueError, match="n_hid must be a multiple of 4"):
        DiscreteVAEConfig(n_hid=18)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        DiscreteVAEConfig(quantizer="fsq")
    model = DiscreteVAE(DiscreteVAEConfig(**SMALL))
    with pytest.raises(ValueError, match=r"pixels must be float \(B, 3, 32, 32\)"):
        model(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=64\)"):
        model.decode(torch.full((1, 4, 4), 64))
