"""`python -m seg` for the mpiexec jobs of tests/test_distributed_training.py, with an optional
fault on one rank:

    mpiexec -n 2 python tests/seg_job.py train --distributed ...              # as python -m seg
    mpiexec -n 2 python tests/seg_job.py --fail-on-rank 1 train --distributed ...

--fail-on-rank R makes rank R's validation raise a ValueError, which the command line turns
into an error message and exit code 2 on that rank alone. With JOB_FAKE_CUPY=1 in the
environment the ranks use tests/fake_cupy.py as CuPy (as in tests/distributed_job.py).
"""
import os
import sys

if os.environ.get("JOB_FAKE_CUPY"):
    import fake_cupy
    fake_cupy.install()

import minidl  # noqa: E402,F401  (first: it sets the Numba thread policy)
from minidl import distributed as dist  # noqa: E402
from seg import cli, train  # noqa: E402


def fail_on_rank(rank):
    original = train.Trainer.evaluate

    def evaluate(self, *args, **kwargs):
        if dist.get_rank() == rank:
            raise ValueError(f"rank {rank} fails on purpose")
        return original(self, *args, **kwargs)
    train.Trainer.evaluate = evaluate


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[0] == "--fail-on-rank":
        fail_on_rank(int(argv[1]))
        argv = argv[2:]
    sys.exit(cli.main(argv))
