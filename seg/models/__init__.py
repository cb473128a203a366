"""seg.models: every architecture of the talk, built by name.

    model = seg.models.build("unet", num_classes=2, in_channels=1, depth=3)
    seg.models.available()   # the names

Each architecture module registers its builders with `@register("name")`.
"""
import importlib

_BUILDERS = {}
# Modules that define architectures; imported on first use so `import seg` stays quick.
_ARCHITECTURE_MODULES = ("unet", "fcn", "segnet", "deconvnet", "fcdensenet", "dilated", "deeplab",
                         "refinenet")
_loaded = False


def register(name):
    """Decorator: make a builder `fn(num_classes, in_channels, **options) -> Module` buildable by name."""
    def wrap(fn):
        _BUILDERS[name] = fn
        return fn
    return wrap


def _load_all():
    global _loaded
    if not _loaded:
        for mod in _ARCHITECTURE_MODULES:
            try:
                importlib.import_module(f"{__name__}.{mod}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{mod}":
                    raise
        _loaded = True


def available():
    """Names accepted by build(), sorted."""
    _load_all()
    return sorted(_BUILDERS)


def build(name, num_classes, in_channels=3, **options):
    """Build architecture `name` mapping (N, in_channels, H, W) to (N, num_classes, H', W')."""
    _load_all()
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_BUILDERS))}.")
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, **options)
