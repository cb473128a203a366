"""LayerNorm, GroupNorm, InstanceNorm2d: per-sample normalisation layers (minidl.ops.sample_norm)."""
from .. import backend
from ..ops import sample_norm as N
from .module import Module, Parameter


def _affine_params(module, shape, elementwise, device, dtype):
    xp = backend.array_module(device)
    dtype = "float32" if dtype is None else dtype
    if elementwise:
        module.weight = Parameter(xp.ones(shape, dtype=dtype))
        module.bias = Parameter(xp.zeros(shape, dtype=dtype))
    else:
        module.weight = module.bias = None


class LayerNorm(Module):
    """x (*, *normalized_shape) -> same shape; weight/bias of normalized_shape when
    elementwise_affine (ones and zeros at first)."""
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        self.elementwise_affine = elementwise_affine
        _affine_params(self, self.normalized_shape, elementwise_affine, device, dtype)

    def forward(self, x):
        return N.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(Module):
    """x (N, C, *) -> same shape, each of num_groups channel groups normalised per sample."""
    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"GroupNorm needs num_groups dividing num_channels, got "
                             f"{num_groups} groups for {num_channels} channels.")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        _affine_params(self, (num_channels,), affine, device, dtype)

    def forward(self, x):
        return N.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class InstanceNorm2d(Module):
    """x (N, C, H, W) -> same shape, each channel of each sample normalised over H, W.

    affine=False by default, as torch. track_running_stats=True (running statistics for
    evaluation) is not supported: it is rarely used and would need batch norm's buffers.
    """
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None):
        super().__init__()
        if track_running_stats:
            raise ValueError("InstanceNorm2d(track_running_stats=True) is not supported; use the "
                             "default False (statistics of each input, in training and eval).")
        self.num_features, self.eps, self.affine = num_features, eps, affine
        _affine_params(self, (num_features,), affine, device, dtype)

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"InstanceNorm2d needs input of shape (N, C, H, W), got {tuple(x.shape)}.")
        return N.instance_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
