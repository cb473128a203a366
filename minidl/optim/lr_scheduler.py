"""Learning-rate schedules: StepLR, ExponentialLR and PolyLR (DeepLab's "poly" policy).

Call `scheduler.step()` once per epoch (or per iteration for PolyLR, as DeepLab does) after
`optimizer.step()`. Each schedule is a closed formula of the step count `last_epoch`, applied
to every group's initial learning rate, so a scheduler restored with load_state_dict continues
exactly where it stopped.
"""
from .optimizer import Optimizer


class LRScheduler:
    def __init__(self, optimizer, last_epoch=-1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__} needs a minidl Optimizer, got "
                            f"{type(optimizer).__name__}.")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            if last_epoch == -1:
                group["initial_lr"] = group["lr"]
            elif "initial_lr" not in group:
                raise KeyError("resuming a schedule (last_epoch != -1) needs 'initial_lr' in every "
                               "parameter group; load the optimizer's state_dict first.")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr, epoch):
        """The learning rate at step `epoch` for a group that started at base_lr."""
        raise NotImplementedError

    def get_lr(self):
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

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
