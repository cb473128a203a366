"""`python -m seg ...`: see seg/cli.py for the subcommands."""
import os
import sys

# One BLAS thread (before NumPy loads): the products are small, and a BLAS thread team on a
# 2-core machine costs more than it saves. An explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from seg.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
