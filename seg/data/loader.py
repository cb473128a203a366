"""Dataset and DataLoader: from a list of samples to training batches (NumPy arrays).

    train, val = KaggleUltrasound(root).split(0.2, seed=0)
    train_set = Dataset(train, load_sample, transform=Augment(size=(96, 128)), cache=True,
                        preprocess=Resize((96, 128)))
    loader = DataLoader(train_set, batch_size=8, shuffle=True, seed=0)
    for epoch in range(10):
        loader.set_epoch(epoch)
        for images, masks in loader:   # images float32 (N, 1, H, W), masks int64 (N, H, W)
            ...

Reproducibility: the order of an epoch is a permutation drawn from (seed, epoch), and sample i
of epoch e is augmented with its own generator seeded (seed, epoch, i). So results do not depend
on threads, timing or on whether prefetching is on. Without ``set_epoch`` the epoch number counts
the loops over the loader (0, 1, 2, ...).

Errors: any error while loading or transforming a sample (a damaged file, a disk error) reaches
the loop that iterates the loader as one SampleLoadError naming the sample, also when it
happened in the prefetch thread; the original error is its ``__cause__``.

Prefetching: while the training step for batch k runs, a background thread already loads and
augments batch k+1 (NumPy/SciPy release the interpreter lock during the heavy work, so the two
really overlap). The thread is a daemon and talks through a bounded queue, so leaving a loop
early or exiting the program never hangs.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

__all__ = ["Dataset", "DataLoader", "collate", "SampleLoadError"]


class SampleLoadError(RuntimeError):
    """Loading or transforming one sample failed; the message names it (``name``: its image
    path, or the sample itself), the original error is ``__cause__``."""

    def __init__(self, name, error):
        self.name = name
        text = str(error)
        if str(name) not in text:       # e.g. an OSError about another file, or no file at all
            text = f"sample {name} could not be loaded ({type(error).__name__}: {error})"
        super().__init__(text)


class Dataset:
    """A list of samples plus how to load and transform them.

    samples: list of Sample (or anything ``load_fn`` accepts).
    load_fn: sample -> (image (H, W) or (H, W, C) float32, mask (H, W) int or None),
        e.g. ``seg.data.load_sample`` or ``ImageMaskFolder(...).load``.
    preprocess: deterministic (image, mask, rng=None) -> (image, mask) applied right after
        loading and before caching, e.g. ``Resize((96, 128))``: caching small images saves memory.
    transform: random (image, mask, rng) -> (image, mask) applied every time, e.g. ``Augment``.
    cache: keep the loaded (and preprocessed) arrays in memory after the first read.
    """

    def __init__(self, samples, load_fn, transform=None, cache=False, preprocess=None):
        self.samples = list(samples)
        self.load_fn = load_fn
        self.transform = transform
        self.preprocess = preprocess
        self.cache = cache
        self._cache = {}
        # Filling the cache from two threads at once would only load an item twice, but a lock
        # keeps memory use predictable.
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """Loaded (and preprocessed) item i, before the random transform: (image, mask)."""
        if self.cache:
            with self._lock:
                hit = self._cache.get(i)
            if hit is not None:
                return hit
        image, mask = self.load_fn(self.samples[i])
        if self.preprocess is not None:
            image, mask = self.preprocess(image, mask, None)
        if self.cache:
            with self._lock:
                self._cache[i] = (image, mask)
        return image, mask

    def get(self, i, rng=None):
        """Item i after the transform, drawn with ``rng`` (default: a generator seeded with i)."""
        image, mask = self.load(i)
        if self.transform is not None:
            if rng is None:
                rng = np.random.default_rng(i)
            image, mask = self.transform(image, mask, rng)
        return image, mask

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"Dataset index {i} out of range for {len(self)} samples.")
        return self.get(i % len(self))


def collate(items, names=None):
    """Stack [(image, mask), ...] into (images float32 (N, C, H, W), masks int64 (N, H, W)).

    Grayscale (H, W) images get C = 1; (H, W, C) images are moved to channels-first.
    masks is None when every item has no mask (test images).
    """
    images = []
    for image, _ in items:
        image = np.asarray(image, dtype=np.float32)
        images.append(image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        where = "" if names is None else f" (first sample {names[0]})"
        raise ValueError(
            f"Images in one batch have different sizes {sorted(shapes)}{where}; "
            "resize them to one size, e.g. Dataset(..., preprocess=Resize((h, w)))."
        )
    masks = [m for _, m in items]
    if all(m is None for m in masks):
        return np.stack(images), None
    if any(m is None for m in masks):
        raise ValueError("A batch mixes samples with and without masks; keep test images in their own Dataset.")
    return np.stack(images), np.stack([np.asarray(m, dtype=np.int64) for m in masks])


_DONE = object()  # end-of-epoch marker put on the queue by the worker


class DataLoader:
    """Batches of a Dataset, optionally shuffled, prefetched in a background thread.

    Iterating yields (images float32 (N, C, H, W), masks int64 (N, H, W) or None).
    batch_size: N (the last batch is smaller unless drop_last=True).
    shuffle: new order every epoch, drawn from (seed, epoch).
    prefetch: prepare the next batch in a background thread (queue of ``prefetch_batches``).
    sampler: an iterable of indices with len() (e.g. DistributedSampler) giving the order
        instead of shuffle; the loader sets its epoch (set_epoch) before each epoch.
    """

    def __init__(self, dataset, batch_size=1, shuffle=False, seed=0, drop_last=False, prefetch=True,
                 prefetch_batches=2, sampler=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.prefetch_batches = max(1, int(prefetch_batches))
        self.epoch = 0
        if sampler is not None and shuffle:
            raise ValueError("DataLoader: pass either shuffle=True or a sampler (which decides "
                             "the order itself), not both.")
        self.sampler = sampler

    def set_epoch(self, epoch):
        """Use ``epoch`` for the next iteration (order and augmentation depend on it)."""
        self.epoch = int(epoch)

    def __len__(self):
        n = len(self.dataset) if self.sampler is None else len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_indices(self, epoch):
        """The list of index arrays that make up the batches of ``epoch``."""
        n = len(self.dataset)
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)   # the loader's epoch numbering drives the sampler's
            order = np.fromiter(self.sampler, dtype=np.int64)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return [order[k:k + self.batch_size] for k in range(0, len(self) * self.batch_size, self.batch_size)]

    def _make_batch(self, indices, epoch):
        samples = getattr(self.dataset, "samples", None)
        # Names for error messages: the image path of a Sample, else the sample itself.
        names = [int(i) for i in indices]
        if samples is not None:
            names = [getattr(samples[int(i)], "image_path", samples[int(i)]) for i in indices]
        items = []
        for i, name in zip(indices, names):
            try:
                items.append(self.dataset.get(int(i), np.random.default_rng([self.seed, epoch, int(i)])))
            except Exception as exc:
                raise SampleLoadError(name, exc) from exc
        return collate(items, None if samples is None else names)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1  # the next loop is the next epoch unless set_epoch says otherwise
        batches = self.batch_indices(epoch)
        if not self.prefetch:
            return (self._make_batch(idx, epoch) for idx in batches)
        return self._prefetching(batches, epoch)

    def _prefetching(self, batches, epoch):
        q = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()

        def put(item):
            # Wait for room, but give up when the consumer has gone away.
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker():
            try:
                for idx in batches:
                    if not put(("batch", self._make_batch(idx, epoch))):
                        return
                put(("done", _DONE))
            except BaseException as exc:  # hand the error to the training loop
                put(("error", exc))

        thread = threading.Thread(target=worker, name="seg-data-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload = q.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise payload
                yield payload
        finally:
            # Runs on normal end, on an exception, and when the loop is left early (the
            # generator is closed): tell the worker to stop and wait for it briefly.
            stop.set()
            thread.join(timeout=5.0)
