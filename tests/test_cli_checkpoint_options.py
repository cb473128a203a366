"""Bad input to the commands that load a checkpoint, each one sentence: a checkpoint whose config
names a model option this version does not know (written by a newer or edited seg), never a
TypeError traceback; and `export --output` naming a folder."""
import numpy as np
import pytest
import tifffile

from seg import cli, models
from seg.checkpoints import save_checkpoint

OPTIONS = {"depth": 2, "features_root": 2, "padding": "same", "batch_norm": True, "dropout": 0.0,
           "dropout_mode": "bottleneck"}


@pytest.fixture
def unknown_option_checkpoint(tmp_path):
    model = models.build("unet", num_classes=2, in_channels=1, **OPTIONS)
    cfg = {"model": "unet", "num_classes": 2, "in_channels": 1, "size": [16, 16],
           "model_options": dict(OPTIONS, wings=3)}
    save_checkpoint(tmp_path / "c.npz", model, meta={"epoch": 1, "config": cfg})
    return str(tmp_path / "c.npz")


@pytest.mark.parametrize("command", ["export", "predict"])
def test_unknown_model_option_is_one_sentence(command, unknown_option_checkpoint, tmp_path, capsys):
    if command == "export":
        argv = ["export", "--output", str(tmp_path / "m.onnx")]
    else:
        (tmp_path / "in").mkdir()
        tifffile.imwrite(tmp_path / "in" / "a.tif", np.zeros((16, 16), np.uint8))
        argv = ["predict", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert cli.main(argv + ["--checkpoint", unknown_option_checkpoint]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint {unknown_option_checkpoint} cannot be used" in err and "wings" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_to_a_folder_is_one_sentence(tmp_path, capsys):
    model = models.build("unet", num_classes=2, in_channels=1, **OPTIONS)
    cfg = {"model": "unet", "num_classes": 2, "in_channels": 1, "size": [16, 16], "model_options": OPTIONS}
    save_checkpoint(tmp_path / "c.npz", model, meta={"epoch": 1, "config": cfg})
    assert cli.main(["export", "--checkpoint", str(tmp_path / "c.npz"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--output {tmp_path} is a folder; name the file to write, e.g. "
                        f"{tmp_path / 'model.onnx'}.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]      # nothing else written
