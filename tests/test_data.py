"""Calibration from an image folder (timm datasets/transforms) feeding Taylor importance."""
import numpy as np
import pytest
from PIL import Image

from conftest import tiny
from vitprune import CompressSpec, compress
from vitprune.cli import main
from vitprune.train.data import calibration_batches
from vitprune.errors import InputError


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{i}.png")
    return tmp_path


def test_calibration_batches_have_model_input_size(image_dir):
    batches = list(calibration_batches(image_dir, (3, 32, 32), batches=2, batch_size=3))
    assert [b[0].shape for b in batches] == [(3, 3, 32, 32)] * 2
    assert set(batches[0][1].tolist()) <= {0, 1}


def test_taylor_with_data_differs_from_random_calibration(image_dir):
    model = tiny("deit_small_patch16_224")
    spec = CompressSpec(target_flops=0.5, importance="taylor", calib_batches=2, batch_size=4, round_to=1)
    data = list(calibration_batches(image_dir, (3, 32, 32), batches=2, batch_size=4))
    with_data = compress(model, spec, calib_data=data)
    without = compress(model, spec)
    assert with_data.report["plan"]["calibration"] == "user data"
    assert abs(with_data.report["flops_ratio"] - 0.5) <= 0.01
    widths = lambda r: [g["after"] for g in r.report["groups"]]
    assert widths(with_data) != widths(without)


def test_empty_or_missing_data_dir_is_bad_input(tmp_path, capsys):
    with pytest.raises(InputError):
        list(calibration_batches(tmp_path / "nope", (3, 32, 32), batches=1, batch_size=1))
    rc = main(["compress", "timm:deit_tiny_patch16_224", "--img-size", "32", "--target-flops", "0.5",
               "--importance", "taylor", "--data", str(tmp_path), "--out", str(tmp_path / "m")])
    assert rc == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("m.*"))
