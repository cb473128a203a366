"""Ctrl-C during training, taken at a safe point.

Python's default SIGINT handler raises KeyboardInterrupt wherever the program happens to be.
Inside a Numba kernel that cannot be done cleanly: the kernel returns a result while an
exception is pending, which Python reports as `SystemError: ... returned a result with an
exception set` (about 1 Ctrl-C in 14 in a CPU training run), and a checkpoint half-way through
its write is lost too. So while training runs, the first Ctrl-C only records the request; the
training loop calls `check()` between batches, where stopping is safe, and that raises
KeyboardInterrupt. A second Ctrl-C raises at once, for a user who cannot wait for the batch.

    with DeferredInterrupt() as interrupt:
        for batch in loader:
            step(batch)
            interrupt.check()          # KeyboardInterrupt here, after a Ctrl-C
"""
import signal
import threading

__all__ = ["DeferredInterrupt", "is_interrupt"]


class DeferredInterrupt:
    """Context manager: SIGINT sets `requested`; `check()` raises KeyboardInterrupt if it is set.

    Outside the main thread (where Python cannot install signal handlers) it changes nothing
    and check() never raises. The previous handler is restored on exit.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def _handle(self, signum, frame):
        if self.requested:               # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def check(self):
        """Raise KeyboardInterrupt if Ctrl-C was pressed since entering (or the last check)."""
        if self.requested:
            self.requested = False
            raise KeyboardInterrupt


def is_interrupt(exc):
    """Whether `exc` is a KeyboardInterrupt, or the SystemError a C extension (a Numba kernel)
    raises when KeyboardInterrupt arrived while it ran (the KeyboardInterrupt is its cause)."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        if not isinstance(exc, SystemError):
            return False
        exc = exc.__cause__ or exc.__context__
    return False
