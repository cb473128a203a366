"""Random numbers for minidl: one generator per device, seeded together by `manual_seed`.

Every random draw in minidl (weight initialisation, dropout masks, `randn`, ...) goes
through `generator(xp)`, except GPU dropout (below), so `minidl.manual_seed(0)` makes a run
repeatable.

    cpu  a numpy.random.Generator (PCG64)
    gpu  a cupy.random.RandomState, created the first time it is asked for, so a
         CPU-only run never imports CuPy; it gets the last seed given to manual_seed.
    gpu  dropout masks only: Philox (`dropout_mask`, kernels/gpu.py), keyed by the last seed,
         whose offset lives in a small device array (`philox_state`) that the kernels advance,
         so a CUDA graph replaying the draw gets new numbers each time. (CPU dropout draws
         from NumPy's generator like everything else.)

The devices draw different streams: the same seed gives repeatable, not identical,
numbers on CPU and GPU. Use `uniform(xp, ...)`, `normal(xp, ...)` and `integers(xp, ...)`
rather than the generator's own methods; they hide the small API differences.

`get_rng_state()` / `set_rng_state(state)` save and restore where the streams are (like
torch.get_rng_state), as a dict of arrays and numbers that `minidl.save` can store in a
checkpoint, so a resumed training run draws the same dropout masks as an uninterrupted one.
"""
import sys

import numpy

_seed = None         # the last manual_seed, or None for fresh OS entropy
_generators = {}     # "numpy" / "cupy" -> generator
# cuRAND keeps its place in the stream on the GPU and CuPy cannot read it out, so the GPU
# state is "a generator freshly seeded with _cupy_seed, nothing drawn yet" (see get_rng_state).
_cupy_seed = None    # the seed the current (or next, lazily made) CuPy generator starts from
_cupy_drawn = False  # True once that generator was handed out for drawing
# The graph-safe GPU stream: Philox key (63 bits, so it fits an int64) and, per GPU id, a (2,)
# int64 device array (key, offset) that the dropout kernels read and advance themselves.
_philox_key = None   # from manual_seed / set_rng_state; None: made from OS entropy at first use
_philox = {}         # device id -> CuPy array (key, offset)
_philox_offset = 0   # where a stream made later (first use after a seed or a restore) starts
_graph_safe = 0      # > 0 while drawing numbers that the GPU draws graph-safely (dropout_mask)


def manual_seed(seed):
    """Seed the generators of every device (like torch.manual_seed). seed: a non-negative int."""
    global _seed, _cupy_seed, _cupy_drawn
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"manual_seed() needs a non-negative integer, got {seed!r}.")
    _seed = int(seed)
    _cupy_seed, _cupy_drawn = _seed, False
    _reset_philox(_seed % 2 ** 63, 0)
    _generators["numpy"] = numpy.random.default_rng(_seed)
    # Reseed CuPy now only if it is already loaded; otherwise `generator` does it lazily.
    _generators.pop("cupy", None)
    if "cupy" in sys.modules:
        try:
            _generators["cupy"] = _make_cupy_generator(sys.modules["cupy"])
        except Exception:   # CuPy imported but no usable GPU: nothing to seed
            pass
    return _seed


def initial_seed():
    """The seed given to the last manual_seed, or None if the generators use OS entropy."""
    return _seed


def _make_cupy_generator(cupy):
    return cupy.random.RandomState(_seed if _cupy_seed is None else _cupy_seed)


def generator(xp=numpy):
    """The generator for the array module `xp` (numpy or cupy)."""
    global _cupy_drawn
    name = xp.__name__
    gen = _generators.get(name)
    if gen is None:
        gen = numpy.random.default_rng(_seed) if name == "numpy" else _make_cupy_generator(xp)
        _generators[name] = gen
    if name != "numpy":
        _cupy_drawn = True   # whoever asks for it may draw: its position is no longer known
    return gen


# ----------------------------------------------------------------------------- saving the state
# NumPy's PCG64 state holds two 128-bit integers; an .npz file holds at most 64-bit ones, so
# each is stored as two uint64 words, high word first.
_WORD = (1 << 64) - 1


def _to_words(value):
    return numpy.array([(int(value) >> 64) & _WORD, int(value) & _WORD], dtype=numpy.uint64)


def _from_words(value):
    """Two uint64 words -> int; a plain int (an older JSON checkpoint) is returned as is."""
    if isinstance(value, (int, numpy.integer)):
        return int(value)
    words = numpy.asarray(value)
    if words.shape != (2,) or words.dtype.kind not in "ui":
        raise ValueError(f"a 128-bit integer of the NumPy RNG state must be 2 uint64 words, got "
                         f"shape {words.shape} of {words.dtype}; pass the dict get_rng_state returned.")
    return (int(words[0]) << 64) | int(words[1])


def _fresh_cupy_seed(previous):
    """A new 63-bit seed derived from `previous` (fresh OS entropy when it is None), so that a
    seeded run re-seeds the GPU with the same numbers every time."""
    entropy = None if previous is None else [int(previous), 0x6D696E69]   # 'mini': any constant
    return int(numpy.random.SeedSequence(entropy).generate_state(1, numpy.uint64)[0] >> 1)


def get_rng_state():
    """Where minidl's random streams are, as a dict that minidl.save can store.

    returns {"seed": the last manual_seed (int) or None,
             "numpy": NumPy's bit_generator state, with PCG64's 128-bit integers as (2,) uint64
                      arrays: {"bit_generator": "PCG64", "state": {"state": (2,), "inc": (2,)},
                      "has_uint32": int, "uinteger": int},
             "cupy": {"seed": int},     (only when CuPy is loaded or was used)
             "philox": {"seed": int, "offset": int}}   (the same; the current GPU's dropout
                      stream: reading its offset waits for the GPU)

    The GPU part: cuRAND keeps its position in the stream on the device and CuPy offers no way
    to read it, so when GPU numbers have been drawn since the last call this function re-seeds
    CuPy's generator with a new seed derived from the old one and returns that seed. The GPU
    stream therefore changes at each call (the same way in every run with the same
    manual_seed), and set_rng_state brings back exactly the stream that followed the call.
    Two calls with no GPU draw in between return the same state.
    """
    global _cupy_seed, _cupy_drawn
    bits = generator(numpy).bit_generator.state
    inner = dict(bits["state"])
    if bits["bit_generator"] in ("PCG64", "PCG64DXSM"):
        inner = {"state": _to_words(inner["state"]), "inc": _to_words(inner["inc"])}
    numpy_state = {key: inner if key == "state" else value for key, value in bits.items()}
    state = {"seed": _seed, "numpy": numpy_state}
    if "cupy" in sys.modules or "cupy" in _generators:
        if _cupy_drawn or _cupy_seed is None:
            _cupy_seed, _cupy_drawn = _fresh_cupy_seed(_cupy_seed), False
            _generators.pop("cupy", None)   # made again, from _cupy_seed, at the next draw
        state["cupy"] = {"seed": _cupy_seed}
        state["philox"] = _philox_position()
    return state


def set_rng_state(state):
    """Put minidl's random streams back where get_rng_state(), maybe saved and loaded with
    minidl.save/minidl.load, found them: the next draws repeat the ones that followed it.

    A state without a "cupy" (or "philox") entry restarts that GPU stream from its "seed" (as
    manual_seed does).
    """
    global _seed, _cupy_seed, _cupy_drawn
    if not isinstance(state, dict) or not isinstance(state.get("numpy"), dict):
        raise ValueError("set_rng_state() needs the dict returned by minidl.get_rng_state() (with a "
                         f"'numpy' entry), got {type(state).__name__}.")
    seed = state.get("seed")
    bad_seed = isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or seed < 0
    if seed is not None and bad_seed:
        raise ValueError(f"the 'seed' of an RNG state must be a non-negative integer or None, got {seed!r}.")
    philox = _philox_entry(state.get("philox"), seed)      # checked before anything changes
    bits = dict(state["numpy"])
    gen = generator(numpy)
    current = type(gen.bit_generator).__name__
    if bits.get("bit_generator") != current:
        raise ValueError(f"the RNG state is for a {bits.get('bit_generator')!r} generator but minidl "
                         f"draws from {current!r}; pass a state saved by minidl.get_rng_state().")
    inner = dict(bits["state"])
    if current in ("PCG64", "PCG64DXSM"):
        inner = {"state": _from_words(inner["state"]), "inc": _from_words(inner["inc"])}
    bits["state"] = inner
    gen.bit_generator.state = bits
    _seed = None if seed is None else int(seed)
    cupy_state = state.get("cupy")
    _cupy_seed = int(cupy_state["seed"]) if isinstance(cupy_state, dict) else _seed
    _cupy_drawn = False
    _generators.pop("cupy", None)       # made again, from _cupy_seed, at the next GPU draw
    _reset_philox(*philox)


def _float_dtype(dtype):
    dtype = numpy.dtype(numpy.float32 if dtype is None else dtype)
    if dtype.kind != "f":
        raise TypeError(f"random floats need a floating dtype, got {dtype}.")
    return dtype


def uniform(xp, shape, low=0.0, high=1.0, dtype=numpy.float32):
    """Array of `shape` drawn uniformly from [low, high) on xp's device."""
    dtype = _float_dtype(dtype)
    draw_dtype = dtype if dtype in (numpy.float32, numpy.float64) else numpy.float32
    gen = generator(xp)
    if xp.__name__ == "numpy":
        u = gen.random(shape, dtype=draw_dtype)
    else:
        u = gen.random_sample(shape, dtype=draw_dtype)
    if low != 0.0 or high != 1.0:
        u = u * draw_dtype.type(high - low) + draw_dtype.type(low)
    return u.astype(dtype, copy=False)


def normal(xp, shape, mean=0.0, std=1.0, dtype=numpy.float32):
    """Array of `shape` drawn from N(mean, std^2) on xp's device."""
    dtype = _float_dtype(dtype)
    draw_dtype = dtype if dtype in (numpy.float32, numpy.float64) else numpy.float32
    z = generator(xp).standard_normal(shape, dtype=draw_dtype)
    if mean != 0.0 or std != 1.0:
        z = z * draw_dtype.type(std) + draw_dtype.type(mean)
    return z.astype(dtype, copy=False)


def integers(xp, low, high, shape, dtype=numpy.int64):
    """Array of `shape` with integers drawn uniformly from [low, high)."""
    gen = generator(xp)
    if xp.__name__ == "numpy":
        return gen.integers(low, high, size=shape, dtype=dtype)
    return gen.randint(low, high, size=shape, dtype=dtype)


def permutation(xp, n):
    """A random permutation of range(n) (e.g. to shuffle a data set)."""
    return generator(xp).permutation(n)


# ----------------------------------------------------------------------------- graph-safe dropout
def dropout_mask(xp, shape, p, dtype):
    """A dropout mask of `shape` on xp's device: 1 / (1 - p) where kept (probability 1 - p),
    else 0, of `dtype`. 0 <= p < 1.

    GPU: drawn by Philox from philox_state(xp) in two launches that also move the stream's
    offset on the device, so the host state does not change and a CUDA graph of the step
    draws new masks on every replay. CPU: NumPy's generator, as every other CPU draw (these
    draws are marked graph-safe, so minidl.cuda.host_state_changes on the CPU tells which
    steps will capture on the GPU).
    """
    dtype = numpy.dtype(dtype)
    if xp.__name__ != "numpy":
        from kernels import gpu     # CuPy arrays: the GPU bundle is importable
        return gpu.dropout_mask(philox_state(xp), shape, p, dtype)
    global _graph_safe
    _graph_safe += 1
    try:
        keep = uniform(xp, shape, dtype=dtype) >= dtype.type(p)
    finally:
        _graph_safe -= 1
    return keep * dtype.type(1.0 / (1.0 - p))


def drawing_graph_safe():
    """True while dropout_mask draws (what host_state_changes does not count as a host draw)."""
    return _graph_safe > 0


def philox_state(xp):
    """The current GPU's graph-safe stream: a (2,) int64 device array (key, offset), made at
    the first use from the last seed. Kernels read it and advance the offset themselves."""
    device = xp.cuda.Device().id
    state = _philox.get(device)
    if state is None:
        state = _philox[device] = xp.array([_current_philox_key(), _philox_offset],
                                           dtype=xp.int64)
    return state


def _current_philox_key():
    global _philox_key
    if _philox_key is None:
        _philox_key = _fresh_cupy_seed(None)      # 63 bits of OS entropy
    return _philox_key


def _philox_entry(entry, seed):
    """(key, offset) to restart Philox from: an RNG state's "philox" entry, or without one the
    state's seed at offset 0 (None: fresh entropy)."""
    if entry is None:
        return (None if seed is None else int(seed) % 2 ** 63), 0
    if not isinstance(entry, dict) or set(entry) != {"seed", "offset"}:
        raise ValueError("the 'philox' entry of an RNG state must be a dict with 'seed' and "
                         "'offset'; pass the dict get_rng_state returned.")
    key, offset = int(entry["seed"]), int(entry["offset"])
    if not (0 <= key < 2 ** 63 and 0 <= offset < 2 ** 63):
        raise ValueError(f"the Philox seed and offset of an RNG state must be in [0, 2^63), got "
                         f"{key} and {offset}; pass the dict get_rng_state returned.")
    return key, offset


def _reset_philox(key, offset):
    """Restart the Philox stream at (key, offset); key None: fresh entropy at the next use.
    The device arrays are written in place: a captured CUDA graph keeps their addresses."""
    global _philox_key, _philox_offset
    # A restored offset must reach a stream made only after the restore too (a resumed run's
    # first dropout comes after set_rng_state).
    _philox_key, _philox_offset = key, int(offset)
    for device, state in _philox.items():
        cuda = sys.modules["cupy"].cuda
        if device == cuda.Device().id:
            state[0], state[1] = _current_philox_key(), int(offset)
        else:
            with cuda.Device(device):     # kernels (this fill too) run on the current GPU
                state[0], state[1] = _current_philox_key(), int(offset)


def _philox_position():
    """{"seed", "offset"} of the current GPU's Philox stream (a host read of the offset)."""
    state = _philox.get(sys.modules["cupy"].cuda.Device().id) if _philox else None
    offset = _philox_offset if state is None else int(state[1])
    return {"seed": _current_philox_key(), "offset": offset}
