"""What `predict --input` accepts before any model is loaded (seg.prediction_inputs.scan_inputs):
one image file, or a folder; anything else is one sentence naming the option."""
import numpy as np
import pytest
from PIL import Image

from seg.errors import UsageError
from seg.prediction_inputs import scan_inputs


def test_one_image_file_is_scanned_alone(tmp_path):
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "b.png")
    scan = scan_inputs(tmp_path / "a.png")
    assert [path.name for path, _ in scan.files] == ["a.png"] and scan.skipped == []
    assert scan.files[0][1].shape == (6, 8) and scan.files[0][1].channels == 1


def test_a_missing_path_or_a_file_of_another_type_is_one_sentence(tmp_path):
    with pytest.raises(UsageError, match=r"--input .*nothere.png does not exist \(give an image file"):
        scan_inputs(tmp_path / "nothere.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError, match=r"--input file .*notes.txt is not a .tif/.tiff/.png image"):
        scan_inputs(tmp_path / "notes.txt")
