"""Whether operations record a graph for backward. `with no_grad():` switches it off."""
import contextlib
import threading

class _GradMode(threading.local):
    """Per-thread switch; the class attribute is the default every new thread starts with."""
    enabled = True


_state = _GradMode()


def is_grad_enabled():
    return _state.enabled


def set_grad_enabled(enabled):
    _state.enabled = bool(enabled)


@contextlib.contextmanager
def no_grad():
    """Run the block without recording a graph (inference, optimizer updates)."""
    previous = is_grad_enabled()
    set_grad_enabled(False)
    try:
        yield
    finally:
        set_grad_enabled(previous)


@contextlib.contextmanager
def enable_grad():
    previous = is_grad_enabled()
    set_grad_enabled(True)
    try:
        yield
    finally:
        set_grad_enabled(previous)
