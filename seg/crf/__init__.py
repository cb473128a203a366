"""Fully connected CRF post-processing (Kraehenbuehl & Koltun 2011), see ``seg/crf/dense.py``.

    from seg.crf import dense_crf
    refined = dense_crf(probs, image, preset="deeplab_v2")     # probs (L, H, W) -> (L, H, W)
"""
from seg.crf.dense import PRESETS, DenseCRF, dense_crf

__all__ = ["DenseCRF", "dense_crf", "PRESETS"]
