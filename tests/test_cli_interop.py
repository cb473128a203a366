"""The command-line side of issue 19: --pretrained on the training commands, `python -m seg
export` checked in ONNX Runtime, and checkpoints written as .safetensors.

Weight files are built from random arrays with torchvision's key names and shapes (the
builders of tests/test_pretrained.py), for networks at 1/16 width.
"""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import minidl
from minidl import optim
from seg import cli, data, models
from seg.checkpoints import load_checkpoint, read_checkpoint_meta, save_checkpoint
from test_pretrained import TINY, _write, torchvision_vgg

ROOT = Path(__file__).resolve().parents[1]
UNET = ["--depth", "2", "--features-root", "2"]


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    return data.write_synthetic_dataset(tmp_path_factory.mktemp("kaggle"), n_subjects=3,
                                        images_per_subject=3, size=(40, 56), n_test=1)


def _train_args(root, out, *extra):
    return ["--data", str(root), "--epochs", "1", "--batch-size", "4", "--size", "32x32",
            "--out", str(out), "--no-progress", "--val-fraction", "0.34", *extra]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- --pretrained
def test_train_any_fine_tunes_fcn8s_from_a_torchvision_vgg16_file(kaggle, tmp_path, capsys):
    weights = tmp_path / "vgg16.safetensors"
    arrays = _write(torchvision_vgg(16, width=TINY), weights)
    out = tmp_path / "run"
    code = _example("train_any").main(_train_args(kaggle, out, "--model", "fcn8s", "--width",
                                                  str(TINY), "--pretrained", str(weights)))
    assert code == 0
    printed = capsys.readouterr().out
    # The layout was recognised from the names; ImageNet's classifier is the only thing skipped.
    assert "with mapping 'vgg16-torchvision': loaded 30 arrays, skipped 2, shape-mismatched 0" in printed
    skipped = [line for line in printed.splitlines() if line.strip().startswith("skipped")]
    assert sorted(skipped[0].split(": ")[1].split(", ")) == ["classifier.6.bias", "classifier.6.weight"]
    # One epoch of training moved the loaded weights only a little from the file's.
    model = models.build("fcn8s", 2, in_channels=1, width=TINY)
    load_checkpoint(out / "last.npz", model)
    w = arrays["features.28.weight"]
    change = np.abs(model.backbone.conv5_3.weight.data - w).max()
    assert 0 < change < 0.1 * np.abs(w).max()
    # The grayscale data's first layer got ImageNet's RGB kernels summed over the colours.
    rgb = arrays["features.0.weight"]
    first = model.backbone.conv1_1.weight.data
    assert first.shape == (rgb.shape[0], 1, 3, 3)
    assert np.abs(first - rgb.sum(axis=1, keepdims=True)).max() < 0.1 * np.abs(rgb).max()


def test_seg_train_loads_the_models_own_names_with_a_given_mapping(kaggle, tmp_path, capsys):
    minidl.manual_seed(7)
    source = models.build("unet", num_classes=2, in_channels=1, depth=2, features_root=2,
                          padding="same", batch_norm=True, dropout=0.0)
    weights = tmp_path / "unet.safetensors"
    minidl.save(source.state_dict(), weights)
    assert cli.main(["train", *_train_args(kaggle, tmp_path / "run", *UNET), "--pretrained",
                     str(weights), "--pretrained-mapping", "none"]) == 0
    printed = capsys.readouterr().out
    n = len(source.state_dict())
    assert f"loaded {n} arrays, skipped 0, shape-mismatched 0, 0 model parameters left" in printed


def test_pretrained_errors_are_one_sentence(kaggle, tmp_path, capsys):
    run = _train_args(kaggle, tmp_path / "run", *UNET)
    assert cli.main(["train", *run, "--pretrained", str(tmp_path / "nope.safetensors")]) == 2
    assert "--pretrained file" in capsys.readouterr().err
    # A VGG file has nothing a U-Net can use: say so instead of training from scratch.
    vgg = tmp_path / "vgg16.npz"
    _write(torchvision_vgg(16, width=TINY), vgg)
    assert cli.main(["train", *run, "--pretrained", str(vgg)]) == 2
    err = capsys.readouterr().err
    assert "none of its 32 arrays fits unet (mapping: vgg16-torchvision)" in err
    assert "--pretrained-mapping" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *run, "--pretrained", str(vgg), "--pretrained-mapping", "vgg17-torch"])
    assert exit_.value.code == 2
    assert "unknown mapping 'vgg17-torch'" in capsys.readouterr().err


def test_mapping_names_are_accepted_in_either_hyphen_order():
    args = cli.parse_train_args(["--pretrained-mapping", "torchvision-vgg16_bn"])
    assert args.pretrained_mapping == "vgg16_bn-torchvision"
    assert cli.parse_train_args([]).pretrained_mapping == "auto"


# ----------------------------------------------------------------------------- export
def _unet_checkpoint(path, size=(32, 32)):
    options = {"depth": 2, "features_root": 4, "padding": "same", "batch_norm": True,
               "dropout": 0.0, "dropout_mode": "bottleneck"}
    minidl.manual_seed(3)
    model = models.build("unet", num_classes=2, in_channels=1, **options)
    for m in model.modules():      # running statistics other than 0 / 1, so that export uses them
        if hasattr(m, "running_mean"):
            m.running_mean[...] = np.linspace(-0.2, 0.2, m.running_mean.size)
            m.running_var[...] = np.linspace(0.5, 1.5, m.running_var.size)
    config = {"model": "unet", "num_classes": 2, "in_channels": 1, "model_options": options,
              "size": list(size)}
    save_checkpoint(path, model, meta={"config": config})
    return model.eval()


def test_seg_export_writes_a_file_onnx_runtime_runs_like_minidl(tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")   # (the test extra installs it)
    model = _unet_checkpoint(tmp_path / "best.npz")
    out = tmp_path / "unet.onnx"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "best.npz"), "--output", str(out),
                     "--opset", "17", "--size", "24x40"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: unet as ONNX opset 17" in printed
    assert "input 'image' batchx1x24x40, output 'logits' batchx2x24x40" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 1, 24, 40), dtype=np.float32)   # batch 3: dynamic
    (logits,) = session.run(["logits"], {"image": x})
    with minidl.no_grad():
        expected = model(minidl.tensor(x)).numpy()
    assert logits.shape == (3, 2, 24, 40)
    assert np.abs(logits - expected).max() <= 1e-4


def test_seg_export_defaults_to_the_training_size_and_reports_bad_input(tmp_path, capsys):
    pytest.importorskip("onnx")
    _unet_checkpoint(tmp_path / "best.npz", size=(16, 24))
    assert cli.main(["export", "--checkpoint", str(tmp_path / "best.npz"), "--output",
                     str(tmp_path / "m.onnx")]) == 0
    assert "input 'image' batchx1x16x24" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none.npz"), "--output",
                     str(tmp_path / "m.onnx")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path / "best.npz"), "--output",
                     str(tmp_path / "no" / "m.onnx")]) == 2
    assert "--output folder" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path / "best.npz"), "--output",
                     str(tmp_path / "m.onnx"), "--opset", "9"]) == 2
    assert "opset_version must be between" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints
def test_a_safetensors_checkpoint_round_trips_through_save_and_load(tmp_path):
    minidl.manual_seed(0)
    model = models.build("unet", num_classes=2, in_channels=1, depth=2, features_root=2)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for p in model.parameters():          # one step, so the optimizer has state to save
        p.grad = np.ones_like(p.data)
    opt.step()
    sched.step()
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, model, opt, sched, {"epoch": 3, "config": {"model": "unet"}})
    assert os.listdir(tmp_path) == ["best.safetensors"]          # no temporary file left
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")                   # safetensors: u64 size, JSON
    assert raw[8:9] == b"{" and header < len(raw) and not raw.startswith(b"PK")
    minidl.manual_seed(1)
    fresh = models.build("unet", num_classes=2, in_channels=1, depth=2, features_root=2)
    fresh_opt = optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_sched = optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    meta = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert meta["epoch"] == 3 and read_checkpoint_meta(path)["config"] == {"model": "unet"}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 5e-4
    p, q = next(iter(opt.state.values())), next(iter(fresh_opt.state.values()))
    assert q["step"] == p["step"] == 1
    np.testing.assert_array_equal(q["exp_avg"], p["exp_avg"])


def test_stale_temporaries_of_a_safetensors_checkpoint_are_recognised(tmp_path):
    import subprocess
    import sys
    from seg.checkpoints import remove_stale_temporaries
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {f".best.safetensors.{dead.pid}.tmp.safetensors": False,        # a killed writer's
             f"..best.safetensors.{dead.pid}.tmp.safetensors.x1y2.tmp": False,
             f".best.safetensors.{os.getpid()}.tmp.safetensors": True,      # a live writer's
             "notes.safetensors": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)
