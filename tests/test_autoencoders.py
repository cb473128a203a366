"""seg.autoencoders: the talk's losses against their closed forms, gradients, and training."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from seg import autoencoders as ae


def _f64(a, grad=True):
    return minidl.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ----------------------------------------------------------------------------- closed forms
@given(st.integers(0, 2**31 - 1), st.floats(0.02, 0.98))
def test_kl_sparsity_equals_the_talks_formula(seed, rho):
    rho_hat = np.random.default_rng(seed).uniform(0.01, 0.99, size=7)
    # The talk's NumPy line, summed over the hidden units.
    expected = (rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))).sum()
    got = ae.kl_sparsity(_f64(rho_hat, grad=False), rho).item()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_kl_sparsity_curve_for_rho_02():
    rho_hat = np.linspace(0.01, 0.99, 99)
    kl = np.array([ae.kl_sparsity(np.array([r]), 0.2).item() for r in rho_hat])
    assert np.all(kl >= -1e-6)
    assert rho_hat[np.argmin(kl)] == pytest.approx(0.2, abs=0.01)   # zero where rho_hat = rho
    # Falls until rho_hat = rho, then rises: a unit pays for being too quiet or too busy.
    left, right = rho_hat < 0.2, rho_hat > 0.2
    assert np.all(np.diff(kl[left]) < 0) and np.all(np.diff(kl[right]) > 0)


def test_mean_activation_and_weight_l2():
    h = np.random.default_rng(0).random((5, 3, 4, 2))
    np.testing.assert_allclose(ae.mean_activation(h).numpy(), h.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(ae.mean_activation(h[:, :, 0, 0]).numpy(), h[:, :, 0, 0].mean(axis=0))
    w1, w2 = np.arange(6.0).reshape(2, 3), np.array([[-1.0, 2.0]])
    assert ae.weight_l2([w1, w2]).item() == 0.5 * (55 + 5)


@given(st.integers(0, 2**31 - 1))
def test_vae_latent_loss_equals_closed_form(seed):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(4, 3))
    sigma = rng.uniform(0.2, 2.0, size=(4, 3))
    # The talk: 0.5 * reduce_sum(mu^2 + sigma^2 - log(sigma^2) - 1, axis 1), per sample.
    per_sample = 0.5 * (mu**2 + sigma**2 - np.log(sigma**2) - 1).sum(axis=1)
    log_var = np.log(sigma**2)
    np.testing.assert_allclose(ae.vae_latent_loss(mu, log_var, reduction="none").numpy(), per_sample)
    np.testing.assert_allclose(ae.vae_latent_loss(mu, sigma=sigma).item(), per_sample.mean())
    np.testing.assert_allclose(ae.vae_latent_loss(mu, log_var, reduction="sum").item(), per_sample.sum())


def test_latent_loss_is_the_kl_divergence_to_the_prior():
    assert ae.vae_latent_loss(np.zeros((2, 5)), np.zeros((2, 5))).item() == 0.0
    # KL(N(mu, sigma^2) || N(0, 1)) = E_q[log q(z) - log p(z)], estimated by sampling z ~ q.
    rng = np.random.default_rng(7)
    mu, sigma = np.array([0.5, -1.0, 0.0]), np.array([0.7, 1.5, 0.3])
    z = mu + sigma * rng.standard_normal((200_000, 3))
    log_q = -0.5 * ((z - mu) / sigma) ** 2 - np.log(sigma)
    log_p = -0.5 * z**2
    expected = (log_q - log_p).sum(axis=1).mean()
    assert ae.vae_latent_loss(mu[None], sigma=sigma[None]).item() == pytest.approx(expected, abs=0.02)


def test_loss_errors_are_clear():
    with pytest.raises(ValueError, match="rho must lie strictly between 0 and 1"):
        ae.kl_sparsity(np.array([0.5]), 1.0)
    with pytest.raises(ValueError, match="rho_hat must lie strictly between 0 and 1"):
        ae.kl_sparsity(np.array([0.5, 0.0]), 0.1)
    with pytest.raises(ValueError, match="exactly one of log_var and sigma"):
        ae.vae_latent_loss(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="reduction must be"):
        ae.vae_latent_loss(np.zeros((1, 2)), np.zeros((1, 2)), reduction="avg")
    with pytest.raises(ValueError, match="divisible by 4"):
        ae.ConvAutoencoder()(np.zeros((1, 1, 10, 12), dtype=np.float32))


# ----------------------------------------------------------------------------- gradients
def test_gradcheck_kl_sparsity_and_weight_l2():
    rng = np.random.default_rng(1)
    rho_hat = _f64(rng.uniform(0.05, 0.95, 6))
    assert minidl.gradcheck(lambda r: ae.kl_sparsity(r, 0.2), [rho_hat])
    # Through the mean activation of sigmoid units, as the sparse autoencoder uses it.
    z = _f64(rng.normal(size=(5, 4)))
    assert minidl.gradcheck(lambda t: ae.kl_sparsity(ae.mean_activation(1 / (1 + (-t).exp())), 0.05), [z])
    w1, w2 = _f64(rng.normal(size=(3, 4))), _f64(rng.normal(size=(2, 3)))
    assert minidl.gradcheck(lambda a, b: ae.weight_l2([a, b]), [w1, w2])


def test_gradcheck_vae_latent_loss_and_reparameterize():
    rng = np.random.default_rng(2)
    mu, log_var = _f64(rng.normal(size=(3, 4))), _f64(rng.normal(size=(3, 4)))
    sigma = _f64(rng.uniform(0.3, 2.0, (3, 4)))
    assert minidl.gradcheck(lambda m, v: ae.vae_latent_loss(m, v), [mu, log_var])
    assert minidl.gradcheck(lambda m, s: ae.vae_latent_loss(m, sigma=s, reduction="sum"), [mu, sigma])
    eps = rng.normal(size=(3, 4))
    assert minidl.gradcheck(lambda m, v: ae.reparameterize(m, v, eps), [mu, log_var])
    z = ae.reparameterize(mu, log_var, eps)
    np.testing.assert_allclose(z.numpy(), mu.numpy() + np.exp(0.5 * log_var.numpy()) * eps)


def test_sparse_autoencoder_loss_matches_numpy():
    minidl.manual_seed(0)
    model = ae.SparseAutoencoder(12, n_hidden=5, rho=0.1, beta=2.0, lam=0.01)
    x = np.random.default_rng(3).random((6, 12)).astype(np.float32)
    total, parts = model.loss(minidl.tensor(x))
    W1, b1 = model.encoder.weight.numpy(), model.encoder.bias.numpy()
    W2, b2 = model.decoder.weight.numpy(), model.decoder.bias.numpy()
    h = _sigmoid(x @ W1.T + b1)
    recon = _sigmoid(h @ W2.T + b2)
    rho_hat = h.mean(axis=0)
    mse = 0.5 * ((recon - x) ** 2).sum(axis=1).mean()        # per image, then batch mean
    kl = (0.1 * np.log(0.1 / rho_hat) + 0.9 * np.log(0.9 / (1 - rho_hat))).sum()
    l2 = 0.5 * ((W1**2).sum() + (W2**2).sum())
    np.testing.assert_allclose(parts["rho_hat"], rho_hat, rtol=1e-5)
    np.testing.assert_allclose([parts["mse"], parts["sparsity"], parts["weights"]], [mse, kl, l2], rtol=1e-5)
    assert total.item() == pytest.approx(mse + 2.0 * kl + 0.01 * l2, rel=1e-5)


def test_vae_loss_matches_numpy_with_fixed_noise():
    minidl.manual_seed(0)
    model = ae.VAE(16, n_hidden=6, n_latent=2)
    x = (np.random.default_rng(4).random((3, 1, 4, 4)) > 0.5).astype(np.float32)
    eps = np.random.default_rng(5).normal(size=(3, 2)).astype(np.float32)
    total, parts = model.loss(minidl.tensor(x), eps=eps)
    p = {k: np.asarray(v) for k, v in model.state_dict().items()}
    relu = lambda a: np.maximum(a, 0)   # noqa: E731
    h = relu(x.reshape(3, -1) @ p["hidden.weight"].T + p["hidden.bias"])
    mu = h @ p["to_mu.weight"].T + p["to_mu.bias"]
    log_var = h @ p["to_log_var.weight"].T + p["to_log_var.bias"]
    z = mu + np.exp(0.5 * log_var) * eps
    logits = relu(z @ p["dec_hidden.weight"].T + p["dec_hidden.bias"]) @ p["dec_out.weight"].T + p["dec_out.bias"]
    y = _sigmoid(logits)
    t = x.reshape(3, -1)
    generation = -(t * np.log(y) + (1 - t) * np.log(1 - y)).sum() / 3
    latent = (0.5 * (mu**2 + np.exp(log_var) - log_var - 1).sum(axis=1)).mean()
    assert parts["generation"] == pytest.approx(generation, rel=1e-4)
    assert parts["latent"] == pytest.approx(latent, rel=1e-4)
    assert total.item() == pytest.approx(generation + latent, rel=1e-4)


# ----------------------------------------------------------------------------- training
def _entropy(x):
    """Mean binary entropy of the pixel values: the least binary cross-entropy can reach."""
    x = np.clip(x, 1e-7, 1 - 1e-7)
    return float(-(x * np.log(x) + (1 - x) * np.log(1 - x)).mean())


@pytest.mark.parametrize("name", ["conv", "conv_mse", "denoising", "sparse", "vae"])
def test_each_autoencoder_learns_on_tiny_data(name):
    minidl.manual_seed(0)
    images = ae.make_shapes(24, size=16, seed=1)
    # floor: the loss of a perfect reconstruction (cross-entropy of soft targets is not 0).
    model, lr, floor = {
        "conv": (lambda: ae.ConvAutoencoder(features=(4, 8)), 2e-2, _entropy(images)),
        "conv_mse": (lambda: ae.ConvAutoencoder(features=(4, 8), loss="mse"), 1e-2, 0.0),
        "denoising": (lambda: ae.DenoisingAutoencoder(features=(4, 8), noise_std=0.2), 2e-2, _entropy(images)),
        "sparse": (lambda: ae.SparseAutoencoder(256, n_hidden=16, rho=0.1, beta=1.0, lam=1e-4), 1e-2, 0.0),
        "vae": (lambda: ae.VAE(256, n_hidden=32, n_latent=2), 1e-2, 256 * _entropy(images)),
    }[name]
    model = model()
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    history = ae.train_autoencoder(model, images, steps=12, batch_size=12, lr=lr, seed=0)
    assert len(history) == 12 and np.all(np.isfinite(history))
    assert np.mean(history[-3:]) - floor < 0.8 * (np.mean(history[:3]) - floor)
    # Every parameter was reached by the gradient and moved.
    for key, value in model.state_dict().items():
        assert not np.allclose(value, before[key]), f"{key} did not change"


def test_models_shapes_and_sampling():
    minidl.manual_seed(0)
    x = ae.make_shapes(2, size=16, seed=0)
    assert x.shape == (2, 1, 16, 16) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(x, ae.make_shapes(2, size=16, seed=0))     # deterministic
    conv = ae.ConvAutoencoder(features=(4, 8))
    y = conv(x)
    assert y.shape == x.shape and 0 <= y.numpy().min() and y.numpy().max() <= 1
    assert conv.encode(x).shape == (2, 8, 4, 4)
    loss, parts = conv.loss(x)
    y = y.numpy()
    bce = -(x * np.log(y) + (1 - x) * np.log(1 - y)).mean()
    assert loss.item() == pytest.approx(bce, rel=1e-4)
    assert parts["mse"] == pytest.approx(((y - x) ** 2).mean(), rel=1e-4)
    seg_net = ae.ConvAutoencoder(features=(4, 8), out_channels=2, output=None)   # the segmentation shape
    assert seg_net(x).shape == (2, 2, 16, 16)
    den = ae.DenoisingAutoencoder(features=(4, 8), noise="masking", noise_std=0.5)
    noisy = den.corrupt(x).numpy()
    assert np.all((noisy == 0) | (noisy == x)) and (noisy != x).any()
    vae = ae.VAE(256, n_hidden=8, n_latent=3)
    assert vae.sample(5, shape=(16, 16)).shape == (5, 16, 16)
    assert vae.reconstruct(x).shape == x.shape
    sparse = ae.SparseAutoencoder(256, n_hidden=7)
    assert sparse(x).shape == x.shape and sparse.encode(x).shape == (2, 7)
