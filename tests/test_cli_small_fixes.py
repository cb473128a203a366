"""Smaller fixes of issue 20, item 9: edge_detection.py --out DIR, predict on one file and past
an unreadable one, the seed-unet preset's cost said up front, the sparse autoencoder's printed
terms, and where the synthetic data goes outside the repository."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from seg import autoencoders as ae
from seg import cli, setup
from seg.errors import UsageError
from image_folders import random_folder

ROOT = Path(__file__).resolve().parents[1]


def test_edge_detection_out_folder_is_created(tmp_path):
    spec = importlib.util.spec_from_file_location("edge_detection", ROOT / "examples" / "edge_detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(str(tmp_path / "new" / "folder") + "/", size=48)
    assert Path(written) == tmp_path / "new" / "folder" / "edge_detection.png" and Path(written).is_file()
    assert module.output_path(str(tmp_path / "new")) == str(tmp_path / "new" / "edge_detection.png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = random_folder(root / "data")
    assert cli.main(["train", "--data", str(data), "--size", "16x16", "--depth", "2", "--epochs", "1",
                     "--no-progress", "--no-augment", "--out", str(root / "run")]) == 0
    return root / "run" / "best.npz", data


def test_predict_takes_a_single_file(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    image = data / "images" / "03.png"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(image), "--output",
                     str(tmp_path / "out"), "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["03.png"]
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "nothing.png"),
                     "--output", str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "--input" in capsys.readouterr().err


def test_one_unreadable_image_does_not_stop_predict(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("00.png", "01.png", "02.png"):
        (inputs / name).write_bytes((data / "images" / name).read_bytes())
    (inputs / "01.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(inputs), "--output",
                     str(tmp_path / "out"), "--no-progress"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00.png", "02.png"]
    captured = capsys.readouterr()
    # The skipped files are listed on stderr, one line each (seg.prediction_inputs).
    skipped = [line for line in captured.err.splitlines() if "01.png" in line]
    assert len(skipped) == 1 and "damaged or not a PNG" in skipped[0]
    assert "wrote 2 mask(s)" in captured.out and "1 image(s) could not be read" in captured.out


def test_seed_unet_preset_says_how_long_before_it_starts(monkeypatch):
    args = cli.parse_train_args(["--preset", "seed-unet"])
    lines = []

    def stop(*a, **k):
        raise UsageError("stop before the data")

    monkeypatch.setattr(setup, "prepare_data", stop)
    with pytest.raises(UsageError, match="stop"):
        setup.set_up_training(args, lines.append)
    assert "400 epochs on 420x580" in lines[0] and "10 hours" in lines[0]
    assert setup.preset_notice(cli.parse_train_args(["--preset", "seed-unet", "--epochs", "3"])) is None
    assert setup.preset_notice(cli.parse_train_args([])) is None


def test_sparse_autoencoder_printed_terms_add_up(capsys):
    model = ae.SparseAutoencoder(36, n_hidden=5, rho=0.1, beta=3.0, lam=0.01)
    images = np.random.default_rng(0).random((8, 36)).astype(np.float32)
    ae.train_autoencoder(model, images, steps=2, log_every=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        loss = float(re.search(r"loss (\S+)", line).group(1))
        terms = [float(v) for v in re.findall(r"(?:mse|sparsity|weights) (\S+)", line)]
        assert len(terms) == 3 and sum(terms) == pytest.approx(loss, abs=2e-4)


def test_synthetic_data_goes_to_a_user_cache_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert setup.default_synthetic_root() == tmp_path / "cache" / "minidl" / "synthetic"
    written, lines = [], []
    monkeypatch.setattr(setup.sdata, "write_synthetic_dataset", lambda root: written.append(root) or root)
    setup.ensure_synthetic(log=lines.append)
    assert written == [tmp_path / "cache" / "minidl" / "synthetic"]
    assert str(written[0]) in lines[0] and re.search(r"about \d+ MB", lines[0])
    assert not (tmp_path / "data").exists()
    monkeypatch.chdir(ROOT)                  # in the repository: data/synthetic, as the README says
    assert setup.default_synthetic_root() == Path("data/synthetic")
