"""Autoencoders: the talk's road from unsupervised learning to encoder-decoder segmentation.

Trains, on small generated images of shapes (discs, squares, triangles), on the CPU:

1. a convolutional autoencoder  (conv + pool down, transposed conv up: the segmentation-net shape);
2. a denoising autoencoder      (noisy input, clean target);
3. a sparse autoencoder         (E = MSE + beta * KL sparsity + lambda * 1/2 sum W^2), and
   plots the talk's curve KL(rho || rho_hat) for rho = 0.2;
4. a variational autoencoder    (reparameterisation trick + latent loss
                                 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)), and samples
                                 new images from z ~ N(0, I).

Each writes a PNG of inputs next to outputs into --out (default runs/autoencoders).

    python examples/autoencoders.py              # about a minute or two on a laptop CPU
    python examples/autoencoders.py --quick      # a few seconds, smoke test

The models and losses live in seg/autoencoders.py.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import minidl  # noqa: E402
from seg import autoencoders as ae, plots  # noqa: E402


def save_figure(fig, path):
    print(f"  wrote {plots.save_figure(fig, path, bbox_inches='tight')}")


def image_rows(rows, titles, path, size):
    """Save a grid: one row per array of images (n, ...) reshaped to size x size."""
    n = min(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles)):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(np.asarray(images[i]).reshape(size, size), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
    save_figure(fig, path)


def predict(model, x):
    """Model output as a NumPy array, without recording a graph."""
    model.eval()
    with minidl.no_grad():
        y = model(minidl.tensor(x)).numpy()
    model.train()
    return y


def kl_curve(out):
    """The talk's plot: KL(rho || rho_hat) against rho_hat for rho = 0.2, from our loss function."""
    rho = 0.2
    rho_hat = np.linspace(0 + 1e-2, 1 - 1e-2, 100)
    kl = np.array([ae.kl_sparsity(np.array([r]), rho).item() for r in rho_hat])
    # The talk computes it directly in NumPy; both must agree.
    direct = rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))
    assert np.allclose(kl, direct, rtol=1e-5, atol=1e-6)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(rho_hat, kl)
    ax.axvline(rho, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("rho_hat (mean activation of a hidden unit)")
    ax.set_ylabel("kl_div")
    ax.set_title("KL(rho || rho_hat), rho = 0.2: zero at rho_hat = rho")
    save_figure(fig, out / "kl_curve.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/autoencoders", help="folder for the PNGs")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per model (default 150 for the two conv models, "
                             "500 for the two fully connected ones)")
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    conv_steps, fc_steps = (150, 500) if args.steps is None else (args.steps, args.steps)
    if args.quick:
        conv_steps, fc_steps = 10, 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minidl.manual_seed(args.seed)
    size = 24
    images = ae.make_shapes(160 if args.quick else 1024, size=size, seed=args.seed)
    train, test = images[:-16], images[-16:]
    show = test[:10]
    times = {}

    print("KL sparsity curve")
    kl_curve(out)

    t = time.perf_counter()
    print(f"\n1. convolutional autoencoder: {size}x{size} -> 32 x {size // 4}x{size // 4} code -> {size}x{size}")
    conv = ae.ConvAutoencoder(in_channels=1, features=(16, 32))
    ae.train_autoencoder(conv, train, steps=conv_steps, batch_size=32, lr=3e-3, log_every=max(1, conv_steps // 4))
    image_rows([show, predict(conv, show)], ["input", "output"], out / "conv_autoencoder.png", size)
    times["convolutional"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n2. denoising autoencoder: input + N(0, 0.3^2) noise, target the clean image")
    den = ae.DenoisingAutoencoder(in_channels=1, features=(16, 32), noise_std=0.3)
    ae.train_autoencoder(den, train, steps=conv_steps, batch_size=32, lr=3e-3, log_every=max(1, conv_steps // 4))
    noisy = den.corrupt(show).numpy()
    image_rows([show, noisy, predict(den, noisy)], ["clean", "noisy", "denoised"],
               out / "denoising_autoencoder.png", size)
    times["denoising"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n3. sparse autoencoder: 576 -> 100 sigmoid units -> 576, rho = 0.05, beta = 3, lambda = 1e-4")
    sparse = ae.SparseAutoencoder(size * size, n_hidden=100, rho=0.05, beta=3.0, lam=1e-4)
    ae.train_autoencoder(sparse, train, steps=fc_steps, batch_size=64, lr=1e-2, log_every=max(1, fc_steps // 4))
    _, parts = sparse.loss(minidl.tensor(test))
    print(f"  mean activation rho_hat on test images: {parts['rho_hat'].mean():.3f} (target 0.05)")
    image_rows([show, predict(sparse, show)], ["input", "output"], out / "sparse_autoencoder.png", size)
    # What each hidden unit looks for: its weight vector as an image (the learned "filters").
    w = sparse.encoder.weight.numpy()[:40]
    w = (w - w.min(axis=1, keepdims=True)) / (np.ptp(w, axis=1, keepdims=True) + 1e-8)
    image_rows([w[:20], w[20:40]], ["units 0-19", "units 20-39"], out / "sparse_units.png", size)
    times["sparse"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n4. variational autoencoder: 576 -> 256 -> (mu, log sigma^2) in 8-D -> 256 -> 576")
    vae = ae.VAE(size * size, n_hidden=256, n_latent=8)
    ae.train_autoencoder(vae, train, steps=fc_steps, batch_size=64, lr=2e-3, log_every=max(1, fc_steps // 4))
    image_rows([show, vae.reconstruct(show)], ["input", "output (z = mu)"], out / "vae_reconstructions.png", size)
    samples = vae.sample(20)
    image_rows([samples[:10], samples[10:]], ["samples", "z ~ N(0, I)"], out / "vae_samples.png", size)
    times["variational"] = time.perf_counter() - t

    print("\nseconds per model: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return times


if __name__ == "__main__":
    main()
