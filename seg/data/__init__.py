"""seg.data: reading segmentation data sets, synthetic ultrasound data, augmentation, batching.

Files (seg.data.readers):
    load_image (-> float32 (H, W) in [0, 1]), load_mask (-> integer class ids (H, W)), read_array
What a data set holds (seg.data.describe): infer_in_channels, infer_mask_classes (MaskClasses)
Samples (seg.data.samples): ``Sample(image_path, mask_path, subject, n)``, load_sample, split_by_subject
Data sets on disk (return lists of Samples):
    KaggleUltrasound, find_kaggle_samples, find_kaggle_test_samples      (seg.data.kaggle)
    ImageMaskFolder, find_folder_samples                  (users' images/ + masks/, seg.data.folder)
Synthetic data (Kaggle layout on disk):
    write_synthetic_dataset, synthetic_image
Augmentation (image and mask together):
    Augment, Resize, resize, hflip, vflip, random_flip, affine, random_affine,
    elastic_deform, elastic_displacement, intensity_jitter
Checking a data set before training (seg.data.check, seg.data.headers):
    check_dataset -> DataReport (problems, samples without problems, summary), read_header
Batching:
    Dataset, DataLoader (images float32 (N, C, H, W), masks int64 (N, H, W)), collate
    DistributedSampler (each rank's share of the indices in data-parallel training)
"""

from .augment import (
    Augment,
    Resize,
    affine,
    elastic_deform,
    elastic_displacement,
    hflip,
    intensity_jitter,
    random_affine,
    random_flip,
    resize,
    vflip,
)
from .check import DataCheckError, DataReport, Problem, check_dataset
from .describe import MaskClasses, infer_in_channels, infer_mask_classes
from .folder import ImageMaskFolder, find_folder_samples
from .headers import Header, read_header
from .kaggle import KaggleUltrasound, find_kaggle_samples, find_kaggle_test_samples
from .loader import DataLoader, Dataset, SampleLoadError, collate
from .readers import IMAGE_SUFFIXES, image_channels, load_image, load_mask, read_array
from .samples import Sample, load_sample, split_by_subject
from .sampler import DistributedSampler
from .synthetic import DEFAULT_SIZE, synthetic_image, write_synthetic_dataset

__all__ = [
    "Sample", "read_array", "load_image", "load_mask", "image_channels", "IMAGE_SUFFIXES",
    "MaskClasses", "infer_mask_classes", "infer_in_channels",
    "KaggleUltrasound", "find_kaggle_samples", "find_kaggle_test_samples", "split_by_subject", "load_sample",
    "ImageMaskFolder", "find_folder_samples",
    "synthetic_image", "write_synthetic_dataset", "DEFAULT_SIZE",
    "Augment", "Resize", "resize", "hflip", "vflip", "random_flip", "affine", "random_affine",
    "elastic_deform", "elastic_displacement", "intensity_jitter",
    "Dataset", "DataLoader", "collate", "DistributedSampler", "SampleLoadError",
    "check_dataset", "DataReport", "DataCheckError", "Problem", "read_header", "Header",
]
