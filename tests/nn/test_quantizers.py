"""vlfast.nn.VectorQuantizer and GumbelQuantizer against plain float64 references: outputs, the
straight-through and loss gradients, EMA, dead-code restarts, k-means, layouts, state_dict."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.nn import GumbelQuantizer, VectorQuantizer
from vlfast.ops.codebook_lookup.reference import spec_lookup

K, D = 24, 6
F64 = torch.float64


def nearest(x, codebook, metric="l2"):
    return spec_lookup(x.detach().double(), codebook.detach().double(), metric)[0]


def make_vq(**kwargs):
    torch.manual_seed(1)
    return VectorQuantizer(K, D, impl="reference", **kwargs).double()


# --- VectorQuantizer: values and gradients -------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("ema", [None, 0.9])
def test_vq_outputs_loss_and_gradients_match_float64_reference(metric, ema):
    vq = make_vq(metric=metric, ema_decay=ema, commitment_weight=0.3).eval()
    z = torch.randn(3, 10, D, dtype=F64, requires_grad=True)
    out = vq(z)
    w = torch.randn_like(z)
    ((out.quantized * w).sum() + out.loss).backward()

    z_ref = z.detach().clone().requires_grad_()
    codebook = vq.codebook.detach().clone().requires_grad_(ema is None)
    x = F.normalize(z_ref, dim=-1) if metric == "cosine" else z_ref
    codes = F.normalize(codebook, dim=-1) if metric == "cosine" else codebook
    index = nearest(z_ref.reshape(-1, D), codebook, metric).view(3, 10)
    q = codes[index]
    loss = 0.3 * ((x - q.detach()) ** 2).mean() + (((q - x.detach()) ** 2).mean() if ema is None else 0)
    quantized = x + (q - x).detach()
    ((quantized * w).sum() + loss).backward()

    assert torch.equal(out.indices, index)
    torch.testing.assert_close(out.quantized, q, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-12, atol=1e-15)
    if ema is None:
        torch.testing.assert_close(vq.codebook.grad, codebook.grad, rtol=1e-12, atol=1e-15)
    else:
        assert vq.codebook.grad is None


def test_straight_through_gradient_is_the_identity():
    vq = make_vq().eval()
    z = torch.randn(40, D, dtype=F64, requires_grad=True)
    w = torch.randn(40, D, dtype=F64)
    (vq(z).quantized * w).sum().backward()
    assert torch.equal(z.grad, w)


def test_channels_first_images_match_channels_last_rows():
    vq = make_vq().eval()
    images = torch.randn(2, D, 5, 3, dtype=F64)
    out = vq(images)
    rows = vq(images.permute(0, 2, 3, 1).reshape(2, 15, D))
    assert out.quantized.shape == images.shape and out.indices.shape == (2, 5, 3)
    assert torch.equal(out.indices.view(2, 15), rows.indices)
    assert torch.equal(out.quantized.permute(0, 2, 3, 1).reshape(2, 15, D), rows.quantized)
    # quantized = z + (q - z).detach() is the code up to rounding
    torch.testing.assert_close(vq.decode(out.indices), out.quantized, rtol=0, atol=1e-15)
    torch.testing.assert_close(vq.embed(rows.indices), rows.quantized, rtol=0, atol=1e-15)


def test_usage_statistics():
    vq = make_vq().eval()
    z = torch.randn(50, D, dtype=F64)
    out = vq(z)
    counts = torch.bincount(out.indices, minlength=K).double()
    p = counts / 50
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    torch.testing.assert_close(out.perplexity, entropy.exp())
    assert out.usage == (counts > 0).double().mean()


def test_low_precision_inputs_use_an_exact_lookup():
    torch.manual_seed(0)
    vq = VectorQuantizer(300, 16, impl="reference").eval()  # float32 codebook
    z = torch.randn(4, 50, 16).bfloat16()
    out = vq(z)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices.view(-1), nearest(z.view(-1, 16).float(), vq.codebook))


# --- training: EMA, dead codes, k-means ------------------------------------------------------------

def ema_reference(codebook, batches, decay, eps, threshold=0.0):
    """One-hot EMA in float64; dead codes restart at torch.randint picks (the module's draws)."""
    cluster_size = torch.ones(K, dtype=F64)
    embed_avg = codebook.clone()
    for x in batches:
        onehot = F.one_hot(nearest(x, codebook), K).double()
        cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)
        embed_avg = decay * embed_avg + (1 - decay) * onehot.T @ x
        n = cluster_size.sum()
        codebook = embed_avg / ((cluster_size + eps) / (n + K * eps) * n)[:, None]
        dead = cluster_size < threshold
        if dead.any():
            picks = x[torch.randint(0, x.shape[0], (int(dead.sum()),))]
            codebook[dead], cluster_size[dead], embed_avg[dead] = picks, threshold, picks * threshold
    return codebook, cluster_size, embed_avg


@pytest.mark.parametrize("threshold", [0.0, 0.8])
def test_ema_and_dead_code_restarts_match_a_plain_reference(threshold):
    vq = make_vq(ema_decay=0.8, eps=1e-3, dead_code_threshold=threshold).train()
    start = vq.codebook.detach().clone()
    batches = [torch.randn(30, D, dtype=F64) * 0.5 + 1.0 for _ in range(4)]  # leaves codes unused
    torch.manual_seed(7)
    for x in batches:
        vq(x)
    torch.manual_seed(7)
    codebook, cluster_size, embed_avg = ema_reference(start, batches, 0.8, 1e-3, threshold)
    torch.testing.assert_close(vq.codebook.detach(), codebook, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vq.cluster_size, cluster_size, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vq.embed_avg, embed_avg, rtol=1e-12, atol=1e-14)
    restarted = (vq.codebook.detach()[:, None] == torch.cat(batches)[None]).all(-1).any(-1)
    assert restarted.any() == (threshold > 0)  # restarted codes are batch vectors


def test_dead_codes_without_ema_restart_from_the_usage_average():
    vq = make_vq(dead_code_threshold=0.999).train()
    x = torch.randn(20, D, dtype=F64)
    used = torch.bincount(nearest(x, vq.codebook), minlength=K) > 0
    assert used.any() and not used.all()
    before = vq.codebook.detach().clone()
    torch.manual_seed(3)
    vq(x)  # usage EMA (decay 0.99, from 1): unused codes fall to 0.99 < threshold and restart
    torch.manual_seed(3)
    picks = x[torch.randint(0, 20, (int((~used).sum()),))]
    assert torch.equal(vq.codebook.detach()[used], before[used])
    assert torch.equal(vq.codebook.detach()[~used], picks)


def test_kmeans_init_runs_lloyd_on_the_first_batch():
    vq = make_vq(kmeans_init=True, kmeans_iters=3, ema_decay=0.9)
    x = torch.cat([torch.randn(40, D, dtype=F64) + 4 * c for c in range(3)])
    torch.manual_seed(5)
    vq.train()(x)
    torch.manual_seed(5)
    centroids = x[torch.randint(0, x.shape[0], (K,))]
    for _ in range(3):
        index = nearest(x, centroids)
        counts = torch.bincount(index, minlength=K).double()
        sums = torch.zeros(K, D, dtype=F64).index_add_(0, index, x)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    assert bool(vq.initted)
    # The first batch then also made one EMA step from the k-means codebook.
    codebook, _, _ = ema_reference(centroids, [x], 0.9, 1e-5)
    torch.testing.assert_close(vq.codebook.detach(), codebook, rtol=1e-12, atol=1e-14)


def test_eval_changes_nothing_and_state_dict_round_trips():
    vq = make_vq(ema_decay=0.9, kmeans_init=True, dead_code_threshold=0.5).train()
    vq(torch.randn(60, D, dtype=F64))
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    assert set(state) == {"codebook", "cluster_size", "embed_avg", "initted"}
    z = torch.randn(11, D, dtype=F64)
    out = vq.eval()(z)
    assert all(torch.equal(v, state[k]) for k, v in vq.state_dict().items())
    other = VectorQuantizer(K, D, ema_decay=0.9, kmeans_init=True, dead_code_threshold=0.5,
                            impl="reference").double()
    other.load_state_dict(state)
    again = other.eval()(z)
    assert bool(other.initted) and torch.equal(again.indices, out.indices)
    assert torch.equal(again.quantized, out.quantized)


def test_cosine_training_keeps_codes_normalised():
    vq = make_vq(metric="cosine", ema_decay=0.9, dead_code_threshold=0.9).train()
    for _ in range(3):
        vq(torch.randn(30, D, dtype=F64) * 3)
    torch.testing.assert_close(vq.codebook.detach().norm(dim=-1), torch.ones(K, dtype=F64))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_codes": 0}, "num_codes must be a positive int"),
    ({"dim": 2.5}, "dim must be a positive int"),
    ({"metric": "dot"}, "metric must be one of"),
    ({"ema_decay": 1.0}, "ema_decay must be None or in"),
    ({"commitment_weight": -1.0}, "commitment_weight must be"),
    ({"dead_code_threshold": float("nan")}, "dead_code_threshold must be"),
    ({"impl": "fast"}, "impl must be one of"),
    ({"channels_first": "yes"}, "channels_first must be"),
])
def test_vq_bad_arguments(kwargs, match):
    args = {"num_codes": K, "dim": D, **kwargs}
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(args.pop("num_codes"), args.pop("dim"), **args)


@pytest.mark.parametrize("z,exc,match", [
    (torch.randn(3, 5, D + 1), ValueError, "has 7 channels on its channels-last"),
    (torch.randn(2, D + 2, 4, 4), ValueError, "has 8 channels on its channels-first"),
    (torch.randn(D), ValueError, "must be \\(N, C\\)"),
    (torch.randint(0, 3, (4, D)), TypeError, "floating-point"),
])
def test_vq_bad_input(z, exc, match):
    with pytest.raises(exc, match=match):
        make_vq()(z)


# --- GumbelQuantizer ------------------------------------------------------------------------------

def gumbel_reference(logits, codebook, temperature, hard):
    """DALL-E's relaxation in float64 with the noise the module draws (same RNG calls, same order)."""
    rows = logits.movedim(1, -1).reshape(-1, K)
    log_q = F.log_softmax(rows, dim=-1)
    kl = (log_q.exp() * (log_q + math.log(K))).sum(-1).mean()
    y = F.softmax((rows - torch.empty_like(rows).exponential_().log()) / temperature, dim=-1)
    if hard:
        y = F.one_hot(y.argmax(-1), K).double() - y.detach() + y
    return (y @ codebook).view(2, 3, 4, D).movedim(-1, 1), kl


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_training_matches_reference_values_and_gradients(hard):
    torch.manual_seed(0)
    gq = GumbelQuantizer(K, D, temperature=0.7, hard=hard, kl_weight=0.5).double().train()
    logits = torch.randn(2, K, 3, 4, dtype=F64, requires_grad=True)
    w = torch.randn(2, D, 3, 4, dtype=F64)
    torch.manual_seed(11)
    out = gq(logits)
    ((out.quantized * w).sum() + out.loss).backward()
    leaves = [logits.detach().clone().requires_grad_(), gq.codebook.detach().clone().requires_grad_()]
    torch.manual_seed(11)
    q, kl = gumbel_reference(*leaves, 0.7, hard)
    ((q * w).sum() + 0.5 * kl).backward()
    torch.testing.assert_close(out.quantized, q, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, 0.5 * kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits.grad, leaves[0].grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gq.codebook.grad, leaves[1].grad, rtol=1e-10, atol=1e-13)
    if hard:  # forward is the argmax code exactly
        torch.testing.assert_close(out.quantized, gq.decode(out.indices), rtol=0, atol=1e-14)


def test_gumbel_soft_path_passes_gradcheck():
    gq = GumbelQuantizer(5, 3, temperature=0.5).double().train()
    logits = torch.randn(4, 5, dtype=F64, requires_grad=True)

    def fn(logits, codebook):
        torch.manual_seed(2)  # the same noise at every evaluation
        out = torch.func.functional_call(gq, {"codebook": codebook}, (logits,))
        return out.quantized, out.loss

    assert torch.autograd.gradcheck(fn, (logits, gq.codebook.detach().clone().requires_grad_()))


def test_gumbel_eval_is_argmax_and_kl_limits():
    gq = GumbelQuantizer(K, D).double().eval()
    logits = torch.randn(7, K, dtype=F64)
    out = gq(logits)
    assert torch.equal(out.indices, logits.argmax(-1))
    assert torch.equal(out.quantized, gq.codebook.detach()[out.indices])
    assert abs(float(gq(torch.zeros(5, K, dtype=F64)).loss)) < 1e-15  # uniform: KL 0
    peaked = torch.full((5, K), -1e4, dtype=F64)
    peaked[:, 3] = 0
    torch.testing.assert_close(gq(peaked).loss, torch.tensor(math.log(K), dtype=F64))


def test_gumbel_bad_input():
    gq = GumbelQuantizer(K, D)
    with pytest.raises(ValueError, match="has 5 channels"):
        gq(torch.randn(2, 5, 3, 3))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_gumbel_temperature_is_checked_at_construction_and_on_assignment(bad):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        GumbelQuantizer(K, D, temperature=bad)
    gq = GumbelQuantizer(K, D, temperature=1)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        gq.temperature = bad  # annealing to an invalid value fails where it happens
    gq.temperature = 1 / 16
    assert gq.temperature == 1 / 16


@pytest.mark.parametrize("make", [lambda: make_vq(), lambda: GumbelQuantizer(K, D)])
def test_decode_refuses_out_of_range_and_non_integer_indices(make):
    quantizer = make()
    for bad in (torch.tensor([[0, K]]), torch.tensor([[-1, 0]])):
        with pytest.raises(ValueError, match=f"indices must be in \\[0, {K}\\)"):
            quantizer.decode(bad)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        quantizer.decode(torch.zeros(1, 2))
    good = torch.tensor([[0, K - 1]])
    torch.testing.assert_close(quantizer.decode(good), quantizer.codes()[good])
