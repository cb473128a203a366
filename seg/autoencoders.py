"""Autoencoders from the talk: plain, denoising, sparse and variational, with their losses.

An autoencoder learns to copy its input through a narrow middle ("dimension reduction and
reconstruct, just like PCA"), so the middle has to keep what matters. The talk walks from it
to segmentation:

- `ConvAutoencoder`: conv + pool down (encoder), transposed conv up (decoder). Train the same
  encoder-decoder on masks instead of the input and it is a segmentation network
  ("encoding-decoding structure, can be supervised learning": DeconvNet, SegNet, U-Net).
- `DenoisingAutoencoder`: the input is corrupted with noise, the target is the clean image.
- `SparseAutoencoder`: a hidden layer wider than needed, kept mostly silent by the KL
  sparsity penalty, plus an L2 weight term:
      E = Omega_mse + beta * Omega_sparsity + lambda * Omega_weights
      Omega_sparsity = sum_i rho log(rho / rho_hat_i) + (1 - rho) log((1 - rho) / (1 - rho_hat_i))
      Omega_weights  = 1/2 sum W^2
  where rho_hat_i is the mean activation of hidden unit i over the batch.
- `VAE`: the encoder gives a mean and a spread per latent variable, z = mu + sigma * eps with
  eps ~ N(0, 1) (the reparameterisation trick: the randomness is an input, so gradients flow
  through mu and sigma), and the latent loss pulls q(z|x) towards N(0, I):
      latent_loss = 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)    (= KL(N(mu, sigma^2) || N(0, 1)))

Every loss is built from differentiable minidl ops, so its backward comes for free and is
checked against finite differences in tests/test_autoencoders.py.

Images are float32 (N, 1, H, W) in [0, 1]; `make_shapes` draws a small data set of them.
"""
from __future__ import annotations

import numpy as np

import minidl
from minidl import functional as F, nn, optim
from minidl import backend
from minidl import random as mrandom

__all__ = [
    "kl_sparsity", "mean_activation", "weight_l2", "vae_latent_loss", "reparameterize",
    "ConvAutoencoder", "DenoisingAutoencoder", "SparseAutoencoder", "VAE",
    "make_shapes", "train_autoencoder",
]


# ----------------------------------------------------------------------------- losses
def _as_tensor(x):
    return x if isinstance(x, minidl.Tensor) else minidl.tensor(x)


def mean_activation(hidden):
    """rho_hat: the average activation of each hidden unit over the batch.

    hidden: (N, D) activations -> (D,); or conv feature maps (N, C, H, W) -> (C,), averaged
    over the batch and all positions (each channel is one "neuron" applied everywhere).
    """
    hidden = _as_tensor(hidden)
    if hidden.ndim == 2:
        return hidden.mean(axis=0)
    if hidden.ndim == 4:
        return hidden.mean(axis=(0, 2, 3))
    raise ValueError(f"hidden must have shape (N, D) or (N, C, H, W), got shape {hidden.shape}.")


def kl_sparsity(rho_hat, rho):
    """Omega_sparsity = sum_i KL(rho || rho_hat_i) between Bernoulli(rho) and Bernoulli(rho_hat_i).

    rho_hat: (D,) mean activations, strictly inside (0, 1) (use sigmoid units).
    rho: the target activation, a number in (0, 1) (small: most units silent most of the time).
    Zero when every rho_hat_i equals rho, and it grows without bound as rho_hat_i -> 0 or 1.
    Returns a scalar tensor.
    """
    rho = float(rho)
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must lie strictly between 0 and 1, got {rho}.")
    rho_hat = _as_tensor(rho_hat)
    xp = backend.get_array_module(rho_hat.data)
    if bool(xp.any((rho_hat.data <= 0) | (rho_hat.data >= 1))):
        raise ValueError("rho_hat must lie strictly between 0 and 1 (mean activations of sigmoid "
                         "units); got a value outside, so the KL divergence is infinite.")
    # rho log(rho / rho_hat) = rho log rho - rho log rho_hat; the rho log rho parts are constants.
    const = rho * np.log(rho) + (1.0 - rho) * np.log(1.0 - rho)
    per_unit = const - rho * rho_hat.log() - (1.0 - rho) * (1.0 - rho_hat).log()
    return per_unit.sum()


def weight_l2(weights):
    """Omega_weights = 1/2 * sum of squares of every weight tensor in `weights` (not the biases)."""
    weights = list(weights)
    if not weights:
        raise ValueError("weight_l2 needs at least one weight tensor.")
    total = (_as_tensor(weights[0]) ** 2).sum()
    for w in weights[1:]:
        total = total + (_as_tensor(w) ** 2).sum()
    return 0.5 * total


def vae_latent_loss(mu, log_var=None, *, sigma=None, reduction="mean"):
    """KL(N(mu, sigma^2) || N(0, 1)) summed over the latent axis: 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1).

    mu: (N, Z). Give the spread either as log_var = log sigma^2 (N, Z), as encoders usually
    output (any real number is valid, and sigma^2 = exp(log_var) is always positive), or as
    sigma (N, Z) > 0 directly, as in the talk's code (`z_stddev`).
    reduction: "mean" over the batch (default), "sum", or "none" for the (N,) per-sample values.
    """
    if (log_var is None) == (sigma is None):
        raise ValueError("vae_latent_loss needs exactly one of log_var and sigma.")
    mu = _as_tensor(mu)
    if log_var is not None:
        log_var = _as_tensor(log_var)
        var = log_var.exp()
    else:
        sigma = _as_tensor(sigma)
        var = sigma * sigma
        log_var = var.log()
    if mu.ndim != 2 or mu.shape != var.shape:
        raise ValueError(f"mu and the spread must both have shape (N, Z); got {mu.shape} and {var.shape}.")
    per_sample = 0.5 * (mu * mu + var - log_var - 1.0).sum(axis=1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


def reparameterize(mu, log_var, eps=None):
    """z = mu + sigma * eps, sigma = exp(log_var / 2), eps ~ N(0, 1) drawn from minidl's generator.

    eps: pass a fixed array to make the draw repeatable (tests do). The sample is a
    differentiable function of mu and log_var; only eps is random.
    """
    mu, log_var = _as_tensor(mu), _as_tensor(log_var)
    if eps is None:
        xp = backend.get_array_module(mu.data)
        eps = mrandom.normal(xp, mu.shape, dtype=mu.dtype)
    return mu + (0.5 * log_var).exp() * eps


# ----------------------------------------------------------------------------- models
class ConvAutoencoder(nn.Module):
    """Encoder (conv 3x3 + ReLU + 2x2 max pool, per level) and mirrored decoder (2x2 transposed conv).

    x: (N, in_channels, H, W) with H and W divisible by 2**len(features) ->
    (N, out_channels, H, W), in [0, 1] when output="sigmoid" (reconstructing images), raw
    scores when output=None (e.g. per-class logits when trained as a segmentation net).
    The code in the middle has features[-1] channels at 1 / 2**len(features) of the size.

    loss: "bce" (default) compares the decoder's logits with the image by binary
    cross-entropy, which works for targets anywhere in [0, 1]; "mse" is the mean squared error
    of sigmoid(logits). With MSE through a sigmoid the gradient vanishes where the sigmoid
    saturates, and on mostly black images the network often gets stuck drawing black
    everywhere; cross-entropy cancels the sigmoid's slope and keeps learning.
    """

    def __init__(self, in_channels=1, features=(16, 32), out_channels=None, output="sigmoid",
                 loss="bce"):
        super().__init__()
        if output not in ("sigmoid", None):
            raise ValueError(f"output must be 'sigmoid' or None, got {output!r}.")
        if loss not in ("bce", "mse"):
            raise ValueError(f"loss must be 'bce' or 'mse', got {loss!r}.")
        features = tuple(int(f) for f in features)
        self.levels = len(features)
        self.output, self.loss_name = output, loss
        down, c = [], in_channels
        for f in features:
            down += [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = f
        up = []
        for f in reversed((features[0],) + features[:-1]):
            # Stride-2 transposed conv doubles the size: the learned opposite of the pool.
            up += [nn.ConvTranspose2d(c, f, 2, stride=2), nn.ReLU()]
            c = f
        up.append(nn.Conv2d(c, out_channels or in_channels, 3, padding=1))
        self.encoder = nn.Sequential(*down)
        self.decoder = nn.Sequential(*up)

    def encode(self, x):
        x = _as_tensor(x)
        step = 2 ** self.levels
        if x.ndim != 4 or x.shape[2] % step or x.shape[3] % step:
            raise ValueError(f"input must be (N, C, H, W) with H and W divisible by {step}, "
                             f"got shape {x.shape}; crop or resize the images.")
        return self.encoder(x)

    def logits(self, x):
        """The decoder's raw output for x, before the sigmoid."""
        return self.decoder(self.encode(x))

    def decode(self, code):
        y = self.decoder(code)
        return F.sigmoid(y) if self.output == "sigmoid" else y

    def forward(self, x):
        return self.decode(self.encode(x))

    def _reconstruction_loss(self, logits, target):
        image = F.sigmoid(logits)
        mse = F.mse_loss(image, target)
        if self.loss_name == "mse":
            return mse, {"mse": mse.item()}
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return bce, {"bce": bce.item(), "mse": mse.item()}

    def loss(self, x):
        """Reconstruction loss of the batch x: returns (loss, {"bce"/"mse": floats})."""
        x = _as_tensor(x)
        return self._reconstruction_loss(self.logits(x), x)


class DenoisingAutoencoder(ConvAutoencoder):
    """A ConvAutoencoder trained to undo corruption: input corrupt(x), target x.

    noise: "gaussian" (add N(0, noise_std^2), then clip to [0, 1]) or "masking" (set a random
    fraction noise_std of the pixels to 0). It cannot just copy its input, so it has to learn
    what clean images look like.
    """

    def __init__(self, in_channels=1, features=(16, 32), noise="gaussian", noise_std=0.3, loss="bce"):
        super().__init__(in_channels, features, loss=loss)
        if noise not in ("gaussian", "masking"):
            raise ValueError(f"noise must be 'gaussian' or 'masking', got {noise!r}.")
        self.noise, self.noise_std = noise, float(noise_std)

    def corrupt(self, x):
        """A noisy copy of x (a constant: the corruption is not differentiated)."""
        x = _as_tensor(x).data
        xp = backend.get_array_module(x)
        if self.noise == "gaussian":
            noisy = xp.clip(x + mrandom.normal(xp, x.shape, std=self.noise_std, dtype=x.dtype), 0, 1)
        else:
            noisy = x * (mrandom.uniform(xp, x.shape, dtype=x.dtype) >= self.noise_std)
        return minidl.tensor(noisy.astype(x.dtype))

    def loss(self, x):
        """Reconstruction loss between the output for corrupt(x) and the clean x."""
        x = _as_tensor(x)
        return self._reconstruction_loss(self.logits(self.corrupt(x)), x)


class SparseAutoencoder(nn.Module):
    """One sigmoid hidden layer with the talk's sparsity and weight penalties.

    x: (N, n_inputs) or images (N, C, H, W) with C*H*W = n_inputs; the reconstruction has x's
    shape. Loss E = Omega_mse + beta * KL sparsity(rho, rho_hat) + lam * 1/2 sum W^2 (both
    weight matrices; biases are not penalised), with Omega_mse = 1/2 sum over pixels of the
    squared error, averaged over the batch.
    """

    def __init__(self, n_inputs, n_hidden=64, rho=0.05, beta=3.0, lam=1e-4):
        super().__init__()
        self.encoder = nn.Linear(n_inputs, n_hidden)
        self.decoder = nn.Linear(n_hidden, n_inputs)
        self.rho, self.beta, self.lam = float(rho), float(beta), float(lam)

    def encode(self, x):
        x = _as_tensor(x)
        return F.sigmoid(self.encoder(x.reshape(x.shape[0], -1)))

    def forward(self, x):
        x = _as_tensor(x)
        return F.sigmoid(self.decoder(self.encode(x))).reshape(*x.shape)

    def loss(self, x):
        """(E, parts): parts holds mse, sparsity, weights (floats, unweighted), rho_hat (ndarray
        (D,)) and terms (dict: the weighted summands, which add up to E)."""
        x = _as_tensor(x)
        hidden = self.encode(x)
        recon = F.sigmoid(self.decoder(hidden)).reshape(*x.shape)
        # Omega_mse as in the UFLDL sparse-autoencoder notes (where the usual beta = 3 and
        # lambda = 1e-4 come from): half the squared error summed over an image's pixels,
        # averaged over the batch. A per-pixel mean would be n_inputs times smaller and the
        # sparsity term would swamp it: every unit falls silent and the output is the mean image.
        mse = 0.5 * F.mse_loss(recon, x, reduction="sum") / x.shape[0]
        rho_hat = mean_activation(hidden)
        sparsity = kl_sparsity(rho_hat, self.rho)
        weights = weight_l2([self.encoder.weight, self.decoder.weight])
        total = mse + self.beta * sparsity + self.lam * weights
        # "terms": the three summands of E as they enter it (weighted), which add up to E.
        terms = {"mse": mse.item(), "beta * sparsity": self.beta * sparsity.item(),
                 "lambda * weights": self.lam * weights.item()}
        return total, {"mse": mse.item(), "sparsity": sparsity.item(), "weights": weights.item(),
                       "rho_hat": backend.to_numpy(rho_hat.data), "terms": terms}


class VAE(nn.Module):
    """Variational autoencoder with fully connected encoder and decoder.

    encode: x (N, n_inputs or C, H, W) -> mu, log_var, each (N, n_latent).
    decode: z (N, n_latent) -> logits (N, n_inputs); sigmoid of them is the image.
    Loss per image (averaged over the batch): the generation loss (binary cross-entropy of
    the pixels, summed) + the latent loss 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1).
    """

    def __init__(self, n_inputs, n_hidden=128, n_latent=8):
        super().__init__()
        self.hidden = nn.Linear(n_inputs, n_hidden)
        self.to_mu = nn.Linear(n_hidden, n_latent)
        self.to_log_var = nn.Linear(n_hidden, n_latent)
        self.dec_hidden = nn.Linear(n_latent, n_hidden)
        self.dec_out = nn.Linear(n_hidden, n_inputs)
        self.n_latent = n_latent

    def encode(self, x):
        x = _as_tensor(x)
        h = F.relu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.to_mu(h), self.to_log_var(h)

    def decode(self, z):
        return self.dec_out(F.relu(self.dec_hidden(z)))

    def forward(self, x, eps=None):
        """(logits (N, n_inputs), mu, log_var); z is sampled with `reparameterize`."""
        mu, log_var = self.encode(x)
        return self.decode(reparameterize(mu, log_var, eps)), mu, log_var

    def loss(self, x, eps=None):
        """(generation + latent, parts), both per image and averaged over the batch."""
        x = _as_tensor(x)
        logits, mu, log_var = self(x, eps)
        target = x.reshape(x.shape[0], -1)
        generation = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / x.shape[0]
        latent = vae_latent_loss(mu, log_var)
        return generation + latent, {"generation": generation.item(), "latent": latent.item()}

    def sample(self, n, shape=None):
        """n new images decoded from z ~ N(0, I): an ndarray (n, n_inputs) or (n, *shape)."""
        xp = backend.array_module(self.device)
        z = mrandom.normal(xp, (n, self.n_latent), dtype=self.to_mu.weight.dtype)
        with minidl.no_grad():
            images = F.sigmoid(self.decode(minidl.tensor(z))).numpy()
        return images.reshape((n,) + tuple(shape)) if shape is not None else images

    def reconstruct(self, x):
        """sigmoid(decode(mu)): the reconstruction at the mean code, no sampling (ndarray, x's shape)."""
        x = _as_tensor(x)
        with minidl.no_grad():
            mu, _ = self.encode(x)
            return F.sigmoid(self.decode(mu)).numpy().reshape(x.shape)


# ----------------------------------------------------------------------------- data and training
def make_shapes(n, size=24, seed=0):
    """n images (n, 1, size, size) float32 in [0, 1]: one filled disc, square or triangle each.

    Random position, size and brightness (0.6 to 1) on a black background, antialiased over
    one pixel. Deterministic for a given seed.
    """
    if n < 1 or size < 8:
        raise ValueError(f"make_shapes needs n >= 1 and size >= 8, got n={n}, size={size}.")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    images = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        kind = rng.integers(3)
        r = rng.uniform(0.15, 0.3) * size
        cy, cx = rng.uniform(r, size - r, 2)
        if kind == 0:     # disc: signed distance to the circle
            d = np.hypot(yy - cy, xx - cx) - r
        elif kind == 1:   # square: Chebyshev distance
            d = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) - 0.85 * r
        else:             # triangle pointing up: the largest of the three side distances
            dy, dx = yy - cy, xx - cx      # outward normals (x, y): (0, 1), (+-0.866, -0.5)
            d = np.maximum.reduce([dy, 0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy]) - 0.5 * r
        images[i, 0] = rng.uniform(0.6, 1.0) * np.clip(0.5 - d, 0.0, 1.0)
    return images


def train_autoencoder(model, images, steps=100, batch_size=32, lr=1e-2, seed=0, log_every=0):
    """Train `model` (anything with `.loss(batch) -> (loss, parts)`) with Adam on `images`.

    images: ndarray (N, ...) float32. Batches are drawn at random (seeded) from the images.
    Returns the list of the loss values, one per step. log_every > 0 prints every so often.
    """
    rng = np.random.default_rng(seed)
    opt = optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for step in range(steps):
        batch = images[rng.choice(len(images), size=min(batch_size, len(images)), replace=False)]
        loss, parts = model.loss(minidl.tensor(batch, device=model.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            if "terms" in parts:      # summands that add up to the loss
                shown = "= " + " + ".join(f"{k} {v:.4f}" for k, v in parts["terms"].items())
            else:
                shown = "(" + ", ".join(f"{k} {v:.4f}" for k, v in parts.items() if isinstance(v, float)) + ")"
            print(f"  step {step:4d}  loss {history[-1]:.4f}  {shown}")
    return history
