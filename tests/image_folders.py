"""Small image/mask folders for the command-line tests (a folder of pairs, as seg.data reads them):

    root = random_folder(tmp_path / "data")              # images/00.png ... and masks/00.png ...
    root = random_folder(tmp_path / "three", classes=3)  # masks hold class ids 0, 1, 2
"""
import numpy as np
from PIL import Image


def random_folder(root, n=12, size=20, classes=2):
    """root/images/NN.png and root/masks/NN.png: n random gray size x size images; the masks are
    the image thresholded at 128 (0/255) for 2 classes, else class ids 0..classes-1 by brightness.
    Returns root."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = (rng.random((size, size)) * 255).astype(np.uint8)
        mask = image // (256 // classes + 1) if classes > 2 else (image > 128) * 255
        Image.fromarray(image).save(root / "images" / f"{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i:02d}.png")
    return root
