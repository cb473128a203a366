"""Learning-rate schedules: StepLR, ExponentialLR, PolyLR (DeepLab's "poly" policy),
CosineAnnealingLR, LinearLR, LambdaLR, OneCycleLR, SequentialLR (e.g. warm-up then decay)
and ReduceLROnPlateau.

Call `scheduler.step()` once per epoch (or per iteration for PolyLR and OneCycleLR) after
`optimizer.step()`. Each schedule but ReduceLROnPlateau is a closed formula of the step
count `last_epoch`, applied to every group's initial learning rate, so a scheduler restored
with load_state_dict continues exactly where it stopped, and SequentialLR can hand over from
one schedule to the next by restarting the count. ReduceLROnPlateau reacts to a measured
metric instead: `scheduler.step(val_loss)`.
"""
import bisect
import math

from .optimizer import Optimizer


class LRScheduler:
    def __init__(self, optimizer, last_epoch=-1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__} needs a minidl Optimizer, got "
                            f"{type(optimizer).__name__}.")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            if last_epoch == -1:
                # setdefault (as PyTorch): a second schedule on the same optimizer (SequentialLR)
                # starts from the same initial rate, not from what the first one set.
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError("resuming a schedule (last_epoch != -1) needs 'initial_lr' in every "
                               "parameter group; load the optimizer's state_dict first.")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr, epoch):
        """The learning rate at step `epoch` for a group that started at base_lr (a schedule
        that treats groups differently overrides lrs_at instead)."""
        raise NotImplementedError

    def lrs_at(self, epoch):
        """The learning rate of every group at step `epoch`."""
        return [self.lr_at(base, epoch) for base in self.base_lrs]

    def get_lr(self):
        return self.lrs_at(self.last_epoch)

    def step(self):
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        """The learning rates the last step() set, one per parameter group."""
        return list(self._last_lr)

    def state_dict(self):
        """Everything but the optimizer: plain numbers, saveable with minidl.save."""
        return {k: (list(v) if isinstance(v, list) else v)
                for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict):
        for key, value in state_dict.items():
            if hasattr(value, "tolist"):   # numbers read back from a file as arrays
                value = value.tolist()
            setattr(self, key, list(value) if isinstance(value, tuple) else value)
        # The optimizer continues at the restored rates (construction set the rates of step 0).
        for group, lr in zip(self.optimizer.param_groups, getattr(self, "_last_lr", [])):
            group["lr"] = lr


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size)."""
    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        if step_size < 1:
            raise ValueError(f"StepLR needs step_size >= 1, got {step_size}.")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** epoch."""
    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** epoch


class PolyLR(LRScheduler):
    """DeepLab's poly policy: lr = base_lr * (1 - min(epoch, total_iters) / total_iters) ** power.

    Reaches 0 at total_iters and stays there (torch.optim.lr_scheduler.PolynomialLR with
    DeepLab's power 0.9).
    """
    def __init__(self, optimizer, total_iters, power=0.9, last_epoch=-1):
        if total_iters < 1:
            raise ValueError(f"PolyLR needs total_iters >= 1, got {total_iters}.")
        self.total_iters, self.power = total_iters, power
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * (1 - min(epoch, self.total_iters) / self.total_iters) ** self.power


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) (1 + cos(pi epoch / T_max)) / 2 (SGDR without
    restarts, Loshchilov & Hutter 2017; PyTorch's closed form). Past T_max it keeps
    following the cosine, as PyTorch's does, rising again."""
    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):  # noqa: N803 - torch's name
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR needs T_max >= 1, got {T_max}.")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class LinearLR(LRScheduler):
    """lr = base_lr * factor, the factor going linearly from start_factor to end_factor over
    total_iters steps and staying there (a warm-up when start_factor < 1)."""
    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5, last_epoch=-1):
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError(f"LinearLR needs 0 < start_factor <= 1 and 0 <= end_factor <= 1, got "
                             f"{start_factor} and {end_factor}.")
        if total_iters < 1:
            raise ValueError(f"LinearLR needs total_iters >= 1, got {total_iters}.")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        t = min(epoch, self.total_iters) / self.total_iters
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * t)


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(epoch); one function, or a list with one per parameter group.
    The functions are not part of state_dict (they are code, not numbers)."""
    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        groups = len(optimizer.param_groups)
        lambdas = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else [lr_lambda] * groups
        if len(lambdas) != groups:
            raise ValueError(f"LambdaLR got {len(lambdas)} functions for {groups} parameter groups; "
                             "give one, or one per group.")
        self.lr_lambdas = lambdas
        super().__init__(optimizer, last_epoch)

    def lrs_at(self, epoch):
        return [base * f(epoch) for base, f in zip(self.base_lrs, self.lr_lambdas)]

    def state_dict(self):
        state = super().state_dict()
        state.pop("lr_lambdas")
        return state


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin 2018), stepped once per batch for total_steps steps.

    The rate rises from max_lr / div_factor to max_lr over the first pct_start of the steps,
    then anneals to max_lr / (div_factor * final_div_factor); three_phase=True comes back
    down to the start value first and anneals in a third phase. anneal_strategy "cos" or
    "linear". When cycle_momentum, momentum (SGD) or beta1 (Adam) moves the opposite way
    between max_momentum and base_momentum; groups that have neither are left alone.
    Stepping past total_steps is an error, as in PyTorch.
    """
    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85,
                 max_momentum=0.95, div_factor=25.0, final_div_factor=1e4, three_phase=False,
                 last_epoch=-1):
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("OneCycleLR needs total_steps, or both epochs and steps_per_epoch.")
            total_steps = epochs * steps_per_epoch
        if total_steps < 2:
            raise ValueError(f"OneCycleLR needs total_steps >= 2, got {total_steps}.")
        if not 0 <= pct_start <= 1:
            raise ValueError(f"OneCycleLR needs pct_start in [0, 1], got {pct_start}.")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"OneCycleLR got anneal_strategy={anneal_strategy!r}; use 'cos' or 'linear'.")
        groups = len(optimizer.param_groups)
        self.max_lrs = list(max_lr) if isinstance(max_lr, (list, tuple)) else [max_lr] * groups
        self.total_steps, self.anneal_strategy = total_steps, anneal_strategy
        self.div_factor, self.final_div_factor = div_factor, final_div_factor
        self.cycle_momentum = cycle_momentum
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        # Phase ends (step numbers) and where each phase goes, as fractions of max_lr.
        up = float(pct_start * total_steps) - 1
        start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)
        top_m, low_m = max_momentum, base_momentum
        # (last step of the phase, lr from, lr to (fractions of max_lr), momentum from, to)
        if three_phase:
            self.phases = [(up, start, 1.0, top_m, low_m), (2 * up, 1.0, start, low_m, top_m),
                           (total_steps - 1, start, end, top_m, top_m)]
        else:
            self.phases = [(up, start, 1.0, top_m, low_m), (total_steps - 1, 1.0, end, low_m, top_m)]
        for group, top in zip(optimizer.param_groups, self.max_lrs):
            group["lr"] = top / div_factor
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))
        return start + (end - start) * pct

    def _fraction(self, step, momentum=False):
        """The rate at `step` as a fraction of max_lr (or, with momentum=True, the momentum)."""
        phase_start = 0.0
        for i, (phase_end, lo, hi, m_lo, m_hi) in enumerate(self.phases):
            if step <= phase_end or i == len(self.phases) - 1:
                pct = min(max((step - phase_start) / max(phase_end - phase_start, 1e-12), 0.0), 1.0)
                return self._anneal(m_lo, m_hi, pct) if momentum else self._anneal(lo, hi, pct)
            phase_start = phase_end
        raise AssertionError("unreachable")

    def lrs_at(self, epoch):
        if epoch >= self.total_steps:
            raise ValueError(f"OneCycleLR stepped {epoch + 1} times, beyond total_steps="
                             f"{self.total_steps}; give a larger total_steps.")
        return [top * self._fraction(epoch) for top in self.max_lrs]

    def step(self):
        super().step()
        if not self.cycle_momentum:
            return
        m = self._fraction(self.last_epoch, momentum=True)   # falls while the rate rises
        for group in self.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (m, group["betas"][1])
            elif "momentum" in group and group["momentum"]:
                group["momentum"] = m


class SequentialLR(LRScheduler):
    """Run schedulers one after another: schedulers[i] from step milestones[i-1] on, its own
    count restarting at 0 there. E.g. warm-up then cosine:

        warm = LinearLR(opt, start_factor=0.1, total_iters=5)
        cos = CosineAnnealingLR(opt, T_max=95)
        sched = SequentialLR(opt, [warm, cos], milestones=[5])
    """
    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        schedulers = list(schedulers)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR needs one milestone fewer than schedulers, got "
                             f"{len(schedulers)} schedulers and {len(milestones)} milestones.")
        for s in schedulers:
            if not isinstance(s, LRScheduler) or s.optimizer is not optimizer:
                raise ValueError("SequentialLR needs LRSchedulers (not ReduceLROnPlateau) built "
                                 "on the optimizer it is given.")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"SequentialLR milestones must increase, got {list(milestones)}.")
        self.schedulers, self.milestones = schedulers, list(milestones)
        for group in optimizer.param_groups:    # undo the first steps the schedulers took
            group["lr"] = group.get("initial_lr", group["lr"])
        super().__init__(optimizer, last_epoch)

    def lrs_at(self, epoch):
        i = bisect.bisect_right(self.milestones, epoch)
        start = self.milestones[i - 1] if i else 0
        return self.schedulers[i].lrs_at(epoch - start)

    def state_dict(self):
        state = {k: v for k, v in super().state_dict().items() if k != "schedulers"}
        state["schedulers"] = [s.state_dict() for s in self.schedulers]
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        for s, sub in zip(self.schedulers, state.pop("schedulers", [])):
            s.load_state_dict(sub)
        super().load_state_dict(state)


class ReduceLROnPlateau(LRScheduler):
    """Divide the rate by 1 / factor when a metric has not improved for `patience` steps.

    Driven by a metric rather than by the step count, so it has its own __init__ and step;
    get_last_lr, state_dict and load_state_dict are LRScheduler's (as in PyTorch 2).

    step(metric) once per evaluation. mode "min" (a loss) or "max" (an accuracy); an
    improvement must beat the best by threshold (relative: best * (1 -+ threshold), or
    absolute: best -+ threshold); after a reduction, `cooldown` steps pass before counting
    again; the rate never goes below min_lr, and changes smaller than eps are skipped.
    """
    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"ReduceLROnPlateau needs a minidl Optimizer, got {type(optimizer).__name__}.")
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateau got mode={mode!r}, threshold_mode={threshold_mode!r}; "
                             "use mode 'min'/'max' and threshold_mode 'rel'/'abs'.")
        if not 0 <= factor < 1:
            raise ValueError(f"ReduceLROnPlateau needs 0 <= factor < 1, got {factor}.")
        self.optimizer = optimizer
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode, self.cooldown, self.eps = threshold, threshold_mode, cooldown, eps
        groups = len(optimizer.param_groups)
        self.min_lrs = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * groups
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = self.cooldown_counter = self.last_epoch = 0
        self._last_lr = [g["lr"] for g in optimizer.param_groups]

    def _better(self, value):
        if self.threshold_mode == "rel":
            margin = abs(self.best) * self.threshold if math.isfinite(self.best) else 0.0
        else:
            margin = self.threshold
        return value < self.best - margin if self.mode == "min" else value > self.best + margin

    def step(self, metrics):
        value = float(metrics)
        self.last_epoch += 1
        if self._better(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            for group, floor in zip(self.optimizer.param_groups, self.min_lrs):
                new = max(group["lr"] * self.factor, floor)
                if group["lr"] - new > self.eps:
                    group["lr"] = new
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
