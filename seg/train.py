"""The training loop every example uses: train, validate, log, plot, checkpoint, resume.

    from seg.train import train
    result = train(model, train_loader, val_loader, loss_fn, optimizer, scheduler=None,
                   epochs=20, out_dir="runs/unet", device="cpu")
    result.best_score, result.history[-1]["val_dice"]

What one epoch does:

1. training: for every batch, forward (mirror-padding the input for valid-padding models, see
   seg.tiling.forward_full), loss, backward, optimizer step; a tqdm bar shows the running loss
   and images/s. Losses are kept as Python floats, and nothing of the graph survives a step,
   so memory does not grow with the number of steps.
2. validation: mean Dice with the Kaggle rule (an empty prediction on an empty mask scores 1),
   mean IoU and pixel accuracy (seg.metrics), plus the validation loss. With more than 2
   classes, "val_dice" is the mean of the per-class Dice over the foreground classes, and the
   per-class Dice and IoU are logged too (columns val_dice_c<k>, val_iou_c<k>).
3. logging: one row appended to out_dir/metrics.csv; out_dir/curves.png redrawn; an
   "X / Y / Pred" panel of a few validation images (out_dir/samples_epochNNN.png).
4. checkpoints: out_dir/last.npz every epoch and out_dir/best.npz when the validation Dice
   improves (seg.checkpoints). A checkpoint holds the model, optimizer and scheduler state, the
   random states (NumPy's and minidl's), the epoch, the best score, the history and the run's
   config, and is written to a temporary file first and then renamed, so a crash mid-write
   never leaves a broken file in place of the previous one.

`resume="runs/unet/last.npz"` continues exactly where that checkpoint ended: the remaining
epochs produce the same losses as an uninterrupted run (the data loader's order and
augmentation depend only on (seed, epoch), which the loop sets each epoch).

A NaN or infinite loss stops the run before the bad update is applied, with one message; the
last good checkpoint stays. So does a sample that fails to load (a file damaged or changed after
the data check, a disk error): TrainingDataError names the file and the checkpoint to resume
from. Ctrl-C stops after the current batch (seg.interrupt: never inside a kernel or a
checkpoint write), saves out_dir/interrupted.npz and returns cleanly.
"""
import contextlib
import csv
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

import minidl
from minidl import backend
from minidl.tensor import Tensor

from . import metrics as seg_metrics
from .acceleration import GraphedSteps, backward_and_step
from .checkpoints import (load_checkpoint, read_checkpoint_meta, remove_stale_temporaries,
                          restore_rng_state, rng_state, save_checkpoint)
from .data.loader import SampleLoadError
from .errors import NonFiniteLossError, TrainingDataError, explain_gpu_out_of_memory
from .interrupt import DeferredInterrupt, is_interrupt
from .losses import batch_inputs
from .tiling import forward_full

__all__ = ["train", "Trainer", "TrainResult", "METRIC_FIELDS"]

#: Columns of metrics.csv, in order.
METRIC_FIELDS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_accuracy", "lr",
                 "seconds", "images_per_s")


@dataclass
class TrainResult:
    history: list = field(default_factory=list)   # one dict per epoch (METRIC_FIELDS)
    best_score: float = float("-inf")             # best validation Dice (or -train loss)
    best_epoch: int = 0
    epochs_done: int = 0
    interrupted: bool = False
    out_dir: str = ""

    @property
    def last(self):
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------- the loop

def _to_device(array, device):
    return backend.to_device(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array,
                             device)


def _current_lr(optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if groups:
        return float(groups[0].get("lr", float("nan")))
    return float(getattr(optimizer, "lr", float("nan")))


class Trainer:
    """Train `model` with `optimizer` on batches (images (N, C, H, W), masks (N, H, W)).

    train_loader / val_loader: iterables of (images float32, masks int) NumPy batches, such
        as seg.data.DataLoader (whose set_epoch is called every epoch for exact resumes).
    loss_fn(logits, target) -> scalar Tensor (see seg.losses).
    scheduler: stepped once per epoch (after the epoch), if given.
    out_dir: where metrics.csv, curves.png, samples_*.png and the checkpoints go.
    config: JSON-able dict stored in the checkpoints (model name and options, image size, ...)
        so `python -m seg predict` can rebuild the model.
    num_classes: for IoU (default: the model's num_classes attribute, else 2).
    plot_every: draw the sample panel every that many epochs (and after the last one).
    log: function for the one-line-per-epoch summaries (print; None to stay quiet).
    step_context: called with no arguments, a context manager around each training forward
        pass and loss (e.g. minidl.amp.autocast; seg.acceleration).
    scaler: a minidl.amp.GradScaler for the backward pass and the update (its state goes into
        the checkpoints), or None.
    cuda_graph: replay the training step as a CUDA graph (seg.acceleration.GraphedSteps).
    """

    def __init__(self, model, train_loader, val_loader, loss_fn, optimizer, scheduler=None,
                 out_dir="runs/unet", device="cpu", config=None, num_classes=None, plot=True,
                 plot_every=1, n_samples=4, progress=True, log=print, step_context=None,
                 scaler=None, cuda_graph=False):
        self.model, self.loss_fn = model, loss_fn
        self.train_loader, self.val_loader = train_loader, val_loader
        self.optimizer, self.scheduler = optimizer, scheduler
        self.out_dir = os.fspath(out_dir)
        self.device = backend.normalize_device(device)
        if self.device == "gpu":
            backend.require_cupy()
        self.config = dict(config or {})
        self.num_classes = int(num_classes or getattr(model, "num_classes", 2))
        self.plot, self.plot_every, self.n_samples = plot, max(1, int(plot_every)), int(n_samples)
        self.progress = progress
        self.log = log or (lambda *a, **k: None)
        self.history = []
        self.best_score, self.best_epoch = float("-inf"), 0
        self.epoch = 0                   # completed epochs
        self._plot_warned = False
        os.makedirs(self.out_dir, exist_ok=True)
        model.to(self.device)
        self.step_context = step_context or contextlib.nullcontext
        self.scaler = scaler
        self.graph = GraphedSteps(model, loss_fn, optimizer, self.device, step_context, scaler,
                                  self.log) if cuda_graph else None

    # -------------------------------------------------------------- paths and checkpoints
    def path(self, name):
        return os.path.join(self.out_dir, name)

    def _meta(self, **extra):
        return {"epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "history": self.history, "config": self.config, "rng": rng_state(),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}), **extra}

    def save(self, name, **extra):
        return save_checkpoint(self.path(name), self.model, self.optimizer, self.scheduler,
                               self._meta(**extra))

    def resume(self, path):
        """Restore everything from checkpoint `path`; training continues after its epoch."""
        meta = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.model.to(self.device)
        self.epoch = int(meta["epoch"])
        self.best_score = float(meta["best_score"])
        self.best_epoch = int(meta.get("best_epoch", 0))
        self.history = [dict(row) for row in meta.get("history", [])]
        restore_rng_state(meta.get("rng", {}))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        # metrics.csv must match the restored history (a crashed run may have written more).
        self._write_metrics_csv()
        self._restore_best(meta)
        return meta

    def _restore_best(self, meta):
        """A crash between writing last.npz and best.npz leaves best.npz one improvement behind;
        when the resumed checkpoint is the best epoch itself, write best.npz again from it."""
        if self.best_epoch != self.epoch or "interrupted_in_epoch" in meta:
            return
        try:
            if read_checkpoint_meta(self.path("best.npz")).get("epoch") == self.epoch:
                return
        except (FileNotFoundError, ValueError):
            pass
        self.save("best.npz")

    def _write_metrics_csv(self):
        tmp = self.path("metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            fields = _csv_fields(self.history[0] if self.history else {})
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.history)
        os.replace(tmp, self.path("metrics.csv"))

    def _append_metrics_csv(self, row):
        path = self.path("metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_csv_fields(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    # -------------------------------------------------------------- one epoch
    def train_epoch(self, epoch, epochs):
        """Run one epoch of training; return (mean loss, images per second)."""
        from tqdm.auto import tqdm

        if hasattr(self.train_loader, "set_epoch"):
            # Order and augmentation depend on the epoch number only: resumes are exact.
            self.train_loader.set_epoch(epoch - 1)
        self.model.train()
        if self.graph is not None:
            self.graph.new_epoch()
        total_loss, n_images, compute_time = 0.0, 0, 0.0
        try:
            n_batches = len(self.train_loader)
        except TypeError:
            n_batches = None
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for step, (images, masks) in enumerate(self.train_loader, 1):
                t0 = time.perf_counter()
                with explain_gpu_out_of_memory("training", images):
                    x = Tensor(_to_device(images, self.device))
                    y = _to_device(masks, self.device)
                    if self.graph is not None:      # the whole step (its update comes before the check)
                        logits, loss = None, self.graph(x, y, masks)
                    else:
                        with self.step_context():
                            logits = forward_full(self.model, x)
                            loss = self.loss_fn(logits, y, *batch_inputs(self.loss_fn, masks))
                    value = float(loss.item())
                    if not math.isfinite(value):
                        self._stop_non_finite(value, epoch, step)
                    if self.graph is None:
                        self.optimizer.zero_grad()
                        backward_and_step(loss, self.optimizer, self.scaler)
                del x, logits, loss           # the graph is freed here, not kept to the next step
                compute_time += time.perf_counter() - t0
                n = len(images)
                total_loss += value * n
                n_images += n
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / n_images:.4f}",
                                img_s=f"{n_images / max(compute_time, 1e-9):.1f}")
                self._check_interrupt()
        finally:
            bar.close()
        if n_images == 0:
            raise ValueError("the training loader gave no batches; check the data folder and the split.")
        return total_loss / n_images, n_images / max(compute_time, 1e-9)

    def _stop_non_finite(self, value, epoch, step):
        if os.path.exists(self.path("last.npz")):
            kept = (f"the last good checkpoint {self.path('last.npz')} (epoch {self.epoch}) is kept; "
                    f"resume from it with a lower learning rate")
        else:
            kept = "no checkpoint was written yet; restart with a lower learning rate"
        raise NonFiniteLossError(
            f"Training stopped: the loss became {value} at epoch {epoch}, step {step} "
            f"(learning rate {_current_lr(self.optimizer):g}); {kept}, or check the data for "
            "bad values.")

    def _data_error_message(self, exc, epoch):
        """One sentence for a sample that failed to load: the file, and how to go on."""
        if os.path.exists(self.path("last.npz")):
            kept = (f"the checkpoint {self.path('last.npz')} of epoch {self.epoch} is intact; fix or "
                    f"remove the file and resume with --resume {self.path('last.npz')}")
        else:
            kept = "no checkpoint was written yet; fix or remove the file and start again"
        return (f"Training stopped in epoch {epoch}: {str(exc).rstrip('.')}; {kept} "
                "(python -m seg check-data DIR checks every file).")

    def evaluate(self, loader, keep_samples=0):
        """Validation metrics on `loader`: loss, Kaggle mean Dice, mean IoU, pixel accuracy.

        Returns (metrics dict, samples) where samples = (images, masks, preds) NumPy arrays of
        the first `keep_samples` images (for the X / Y / Pred panel).
        """
        self.model.eval()
        total_loss, n_images = 0.0, 0
        scores = seg_metrics.RunningScores(self.num_classes)
        kept = ([], [], [])
        with minidl.no_grad():
            for images, masks in loader:
                with explain_gpu_out_of_memory("validation", images):
                    x = Tensor(_to_device(images, self.device))
                    logits = forward_full(self.model, x)
                    value = float(self.loss_fn(logits, _to_device(masks, self.device)).item())
                pred = backend.to_numpy(logits.data.argmax(axis=1))
                masks = np.asarray(backend.to_numpy(masks))
                total_loss += value * len(images)
                n_images += len(images)
                scores.add(pred, masks)
                have = len(kept[0])
                if have < keep_samples:
                    take = keep_samples - have
                    kept[0].extend(np.asarray(backend.to_numpy(images))[:take])
                    kept[1].extend(masks[:take])
                    kept[2].extend(pred[:take])
                self._check_interrupt()
        self.model.train()
        summary, total_loss, n_images = self._totals(scores, total_loss, n_images)
        if n_images == 0:
            raise ValueError("the validation loader gave no batches; check the split.")
        result = {"val_loss": total_loss / n_images, "val_dice": summary["dice"],
                  "val_iou": summary["iou"], "val_accuracy": summary["accuracy"],
                  **seg_metrics.class_columns(summary)}
        samples = tuple(np.stack(k) for k in kept) if kept[0] else None
        return result, samples

    def _totals(self, scores, loss_sum, n_images):
        """evaluate's totals -> (scores.summary(), loss sum, number of images); a
        DistributedTrainer sums them over the ranks first."""
        return scores.summary(), loss_sum, n_images

    # -------------------------------------------------------------- the run
    def fit(self, epochs, resume=None):
        """Train until `epochs` epochs are complete (counting those of a resumed checkpoint)."""
        if resume is not None:
            meta = self.resume(resume)
            self.log(f"Resumed from {resume} after epoch {meta['epoch']} ({self._best_text()}).")
        elif self.epoch == 0 and os.path.exists(self.path("metrics.csv")):
            os.remove(self.path("metrics.csv"))    # a new run starts its own table, never appends
        remove_stale_temporaries(self.out_dir)    # left by a run killed while saving
        result = TrainResult(out_dir=self.out_dir)
        epoch = self.epoch + 1
        try:
            with DeferredInterrupt() as self._interrupt:
                for epoch in range(self.epoch + 1, int(epochs) + 1):
                    self._run_epoch(epoch, int(epochs))
        except (KeyboardInterrupt, SystemError) as exc:
            if not is_interrupt(exc):
                raise
            # Keep the partial epoch's work. Resuming from interrupted.npz repeats the rest of
            # epoch `epoch`; last.npz is the exact end of the previous epoch.
            path = self.save("interrupted.npz", interrupted_in_epoch=epoch)
            self.log(self._interrupted_text(epoch, path))
            result.interrupted = True
        except SampleLoadError as exc:
            raise TrainingDataError(self._data_error_message(exc, epoch)) from exc
        finally:
            self._interrupt = None
        if self.plot and self.history:
            self._plot_samples()
        result.history = list(self.history)
        result.best_score, result.best_epoch = self.best_score, self.best_epoch
        result.epochs_done = self.epoch
        return result

    def _check_interrupt(self):
        """Stop here (KeyboardInterrupt) if Ctrl-C was pressed during fit (seg.interrupt)."""
        if getattr(self, "_interrupt", None) is not None:
            self._interrupt.check()

    def _best_text(self):
        if math.isfinite(self.best_score) and self.best_epoch:
            return f"best validation Dice {self.best_score:.4f} at epoch {self.best_epoch}"
        return "no validation score yet"

    def _interrupted_text(self, epoch, path):
        text = f"\nInterrupted in epoch {epoch}: saved {path}. Resume with --resume {path}"
        last = self.path("last.npz")
        if self.epoch > 0 and os.path.exists(last):    # a last.npz of this run, not an older one
            return text + f" (or --resume {last} to continue exactly after epoch {self.epoch})."
        return text + f" (it holds the weights part-way through epoch {epoch})."

    def _run_epoch(self, epoch, epochs):
        start = time.perf_counter()
        train_loss, images_per_s = self.train_epoch(epoch, epochs)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": _current_lr(self.optimizer),
               "images_per_s": images_per_s}
        samples = None
        if self.val_loader is not None:
            plot_now = self.plot and (epoch % self.plot_every == 0 or epoch == epochs)
            scores, samples = self.evaluate(self.val_loader, self.n_samples if plot_now else 0)
            row.update(scores)
            score = scores["val_dice"]
        else:
            row.update(val_loss=float("nan"), val_dice=float("nan"), val_iou=float("nan"),
                       val_accuracy=float("nan"))
            score = -train_loss
        if self.scheduler is not None:
            self.scheduler.step()
        row["seconds"] = time.perf_counter() - start
        self.history.append(row)
        self.epoch = epoch
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, epoch
        # last.npz first: if best.npz's write is interrupted, last.npz is already complete.
        self.save("last.npz")
        if improved:
            self.save("best.npz")
        self._append_metrics_csv(row)
        if self.plot:
            self._plot_epoch(epoch, samples)
        self.log(f"epoch {epoch}/{epochs}  loss {train_loss:.4f}  val loss {row['val_loss']:.4f}  "
                 f"val Dice {row['val_dice']:.4f}  IoU {row['val_iou']:.4f}  "
                 f"acc {row['val_accuracy']:.4f}  {images_per_s:.1f} img/s  {row['seconds']:.1f}s"
                 + ("  *" if improved else "") + seg_metrics.format_class_scores(row))

    # -------------------------------------------------------------- plots
    def _plot_epoch(self, epoch, samples):
        from . import plots
        try:
            plots.plot_curves(self.history, self.path("curves.png"))
            if samples is not None:
                self._last_samples = (epoch, samples)
                plots.plot_samples(*samples, self.path(f"samples_epoch{epoch:03d}.png"),
                                   title=f"epoch {epoch}: X / Y / Pred")
        except Exception as exc:   # a plotting problem must not end a long training run
            if not self._plot_warned:
                self.log(f"warning: could not draw the plots ({type(exc).__name__}: {exc}); "
                         "training continues.")
                self._plot_warned = True

    def _plot_samples(self):
        """samples_last.png: the panel for the model as it is now (end of the run)."""
        from . import plots
        if self.val_loader is None:
            return
        try:
            epoch, samples = getattr(self, "_last_samples", (None, None))
            if epoch != self.epoch or samples is None:
                _, samples = self.evaluate(self.val_loader, self.n_samples)
            plots.plot_samples(*samples, self.path("samples_last.png"),
                               title=f"after epoch {self.epoch}: X / Y / Pred")
        except Exception as exc:
            if not self._plot_warned:
                self.log(f"warning: could not draw the sample panel ({type(exc).__name__}: {exc}).")
                self._plot_warned = True


def _csv_fields(row):
    """metrics.csv's columns: METRIC_FIELDS, then the per-class ones of a multi-class run."""
    return METRIC_FIELDS + tuple(k for k in row if k.startswith(("val_dice_c", "val_iou_c")))


def train(model, train_loader, val_loader, loss_fn, optimizer, scheduler=None, epochs=10,
          out_dir="runs/unet", device="cpu", resume=None, trainer_class=None, **options):
    """Train and validate for `epochs` epochs; see Trainer for the options. Returns TrainResult.

    trainer_class: Trainer or a subclass (seg.distributed_training.DistributedTrainer)."""
    trainer = (trainer_class or Trainer)(model, train_loader, val_loader, loss_fn, optimizer,
                                         scheduler, out_dir=out_dir, device=device, **options)
    return trainer.fit(epochs, resume=resume)
