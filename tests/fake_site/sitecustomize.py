"""Installs the host CuPy emulation (tests/fake_cupy.py) in every Python process started with
this folder on PYTHONPATH: the dry run of scripts/gpu_check.sh (GPU_CHECK_FAKE=1) uses it so
that examples and pytest alike see a "GPU". Never on the path otherwise."""
import fake_cupy

fake_cupy.install()
