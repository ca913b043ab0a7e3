"""Smoke test of the training recipe examples/train_fgvc.py on a tiny ImageFolder made here:
train, checkpoint, resume, the widened VGG16, DDP under torchrun, and the message when
torchvision is missing.

Needs torchvision (the recipe's only extra dependency, ``pip install ".[recipe]"``); skipped
without it. About 30 s on two cores, mostly the start-up (imports) of the child processes.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import child_env

torchvision = pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_fgvc.py"
K = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """K classes x 4 random 40x40 RGB PNGs in train/ and in val/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fgvc")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(K):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def run(data, out, *extra, epochs=2, arch="resnet18", image_size=64, batch_size=4, launcher=()):
    # resnet18 at 64 px: a 2x2 last map (at 32 px it would be 1x1, where MC-Loss is trivial)
    cmd = [
        sys.executable,
        *launcher,
        str(SCRIPT),
        "--data",
        str(data),
        "--arch",
        arch,
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--image-size",
        str(image_size),
        "--weights",
        "none",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--workers",
        "0",
        "--lr",
        "0.01",
        *extra,
    ]
    # one thread: on a busy 2-core machine two OpenMP threads spin-wait, 0.3 s -> 9 s an epoch
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def check_metrics(out, epochs):
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, epochs + 1))
    for e in metrics["epochs"]:
        for key in ("train_loss", "train_ce", "train_dis", "train_div", "val_loss"):
            assert math.isfinite(e[key]), (key, e)
        assert 0.0 <= e["train_acc"] <= 1.0 and 0.0 <= e["val_acc"] <= 1.0, e
        assert e["steps"] == 2
    assert metrics["config"]["num_classes"] == K  # inferred from the class folders
    return metrics


def test_train_then_resume_resnet18(data, tmp_path):
    out = tmp_path / "out"
    stdout = run(data, out, "--progress", "plain", "--log-every", "1")
    assert "epoch 2/2:" in stdout and "best val top-1" in stdout, stdout
    assert "  epoch 1/2 2/2 loss" in stdout, stdout  # the plain progress lines
    first = check_metrics(out, 2)
    assert first["config"]["channels"] == 512 and first["config"]["cnum"] is None
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optimizer", "scaler", "best"}

    # one more epoch from last.pt: it starts at epoch 3 and keeps the history
    stdout = run(data, out, "--resume", str(out / "last.pt"), "--progress", "tqdm", epochs=3)
    assert "epochs 3..3" in stdout and "epoch 3/3:" in stdout and "epoch 1/2:" not in stdout
    resumed = check_metrics(out, 3)
    assert resumed["epochs"][:2] == first["epochs"]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3


def test_train_widened_vgg16_bn_amp(data, tmp_path):
    out = tmp_path / "out"
    run(data, out, "--cnum", "2", "--amp", epochs=1, arch="vgg16_bn", image_size=32)
    metrics = check_metrics(out, 1)
    assert metrics["config"]["channels"] == K * 2 and metrics["config"]["cnum"] == 2


def test_train_ddp_two_processes(data, tmp_path):
    # torchrun, two CPU processes on gloo: 6 training images and 2 steps of 2 each per rank
    out = tmp_path / "out"
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    stdout = run(data, out, epochs=1, batch_size=2, launcher=launcher)
    assert stdout.count("epoch 1/1:") == 1, stdout  # rank 0 alone prints
    metrics = check_metrics(out, 1)
    assert metrics["config"]["world"] == 2
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_widened_vgg16_gives_k_times_cnum_channels():
    spec = importlib.util.spec_from_file_location("train_fgvc", SCRIPT)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    for arch in ("vgg16", "vgg16_bn"):
        backbone, channels = recipe.build_backbone(arch, "none", 5, 3)
        model = recipe.MCNet(backbone, channels, 5).eval()
        with torch.no_grad():
            features, logits = model(torch.randn(2, 3, 64, 64))
        # 15 channels at stride 16, as published (600 channels, 14x14, at 224 px for CUB-200)
        assert channels == 15 and features.shape == (2, 15, 4, 4), features.shape
        assert logits.shape == (2, 5)


def test_missing_torchvision_exits_with_a_message(data, tmp_path):
    code = (
        "import runpy, sys; sys.modules['torchvision'] = None; "
        f"sys.argv = ['train_fgvc.py', '--data', {str(data)!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs torchvision" in proc.stderr and "pip install" in proc.stderr, proc.stderr
