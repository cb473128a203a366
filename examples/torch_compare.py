"""The same U-Net training step in PyTorch, and a time breakdown of minidl's step.

Used by examples/benchmark_gpu.py --compare-torch. PyTorch is never a dependency: everything
here takes the `torch` module as an argument, imported by the caller only when present.

The PyTorch model copies seg.models.unet.UNet (batch_norm=False, padding="same"): per level two
3x3 convs + ReLU, 2x2 max pooling down, 2x2 stride-2 transposed conv up, concatenation
[skip, up], a 1x1 classifier; cross-entropy loss, Adam. layer_list() of either model lists
(kind, weight shape) in the same order, so a test can check the two are the same network.
"""
import time


def build_torch_unet(torch, num_classes=2, in_channels=1, depth=5, features_root=64):
    """A torch.nn.Module with the layers of seg.models.build("unet", ..., padding="same")."""
    nn = torch.nn

    class DoubleConv(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [features_root * 2 ** level for level in range(depth)]
            self.down, channels = nn.ModuleList(), in_channels
            for width in widths:
                self.down.append(DoubleConv(channels, width))
                channels = width
            self.upconvs, self.up = nn.ModuleList(), nn.ModuleList()
            for width in reversed(widths[:-1]):
                self.upconvs.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
                self.up.append(DoubleConv(2 * width, width))
                channels = width
            self.classifier = nn.Conv2d(channels, num_classes, 1)

        def forward(self, x):
            skips = []
            for level, block in enumerate(self.down):
                x = block(x)
                if level < depth - 1:
                    skips.append(x)
                    x = torch.nn.functional.max_pool2d(x, 2)
            for upconv, block, skip in zip(self.upconvs, self.up, reversed(skips)):
                x = block(torch.cat([skip, upconv(x)], dim=1))
            return self.classifier(x)

    return UNet()


def layer_list(model):
    """[(kind, weight shape)] of the convolutions in registration order, for minidl or torch."""
    out = []
    for m in model.modules():
        kind = type(m).__name__
        kind = "Conv2d" if kind == "ConvReLU2d" else kind    # minidl's Conv2d, ReLU fused in
        if kind in ("Conv2d", "ConvTranspose2d"):
            out.append((kind, tuple(m.weight.shape)))
    return out


def parameter_count(model):
    return sum(int(p.numel()) if hasattr(p, "numel") else int(p.size) for p in model.parameters())


# PyTorch's three settings: exact float32, its defaults for convolutions (TF32), bf16 autocast.
TORCH_MODES = ("float32", "tf32", "bf16")


def torch_step_time(torch, depth, features, batch, size, mode, warmup=2, iters=5):
    """Median seconds of one PyTorch training step (forward, CE, backward, Adam) on CUDA."""
    if mode not in TORCH_MODES:
        raise ValueError(f"mode must be one of {TORCH_MODES}, got {mode!r}.")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    tf32 = mode != "float32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    model = build_torch_unet(torch, depth=depth, features_root=features).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=dev)
    target = torch.randint(0, 2, (batch, size, size), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del model, opt, x, target
    torch.cuda.empty_cache()        # give the memory back before minidl (CuPy) runs again
    times.sort()
    return times[len(times) // 2]


# ---------------------------------------------------------------------------- breakdown
class Breakdown:
    """Time spent in categories of minidl's step, from marks around the functions doing the work.

    `wrap(owner, name, category)` replaces owner.name by a function that records a mark (a CUDA
    event on the GPU, the host clock on the CPU) before and after the original; only the
    outermost wrapped call counts, so nested categories are not counted twice. What no category
    covers (other kernels, and the GPU's idle gaps while the host is launching) is the step's
    time minus the categories: "other + idle".
    """

    def __init__(self, clock):
        self.clock = clock
        self.pairs = []         # (category, start mark, end mark)
        self._saved = []
        self._depth = 0

    def _mark(self):
        if self.clock.cp is None:
            return time.perf_counter()
        event = self.clock.cp.cuda.Event()
        event.record()
        return event

    def _elapsed(self, a, b):
        if self.clock.cp is None:
            return b - a
        return self.clock.cp.cuda.get_elapsed_time(a, b) / 1e3

    def wrap(self, owner, name, category):
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        bd = self

        def timed(*args, **kwargs):
            if bd._depth:
                return original(*args, **kwargs)
            bd._depth += 1
            start = bd._mark()
            try:
                return original(*args, **kwargs)
            finally:
                bd.pairs.append((category, start, bd._mark()))
                bd._depth -= 1
        setattr(owner, name, timed)

    def restore(self):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []

    def measure(self, step, categories):
        """Run step() once; {category: seconds} including "other + idle" and "step"."""
        self.pairs = []
        self.clock.sync()
        begin = self._mark()
        step()
        end = self._mark()
        self.clock.sync()
        out = {c: 0.0 for c in categories}
        for category, a, b in self.pairs:
            out[category] += self._elapsed(a, b)
        out["step"] = self._elapsed(begin, end)
        out["other + idle"] = out["step"] - sum(out[c] for c in categories)
        return out
