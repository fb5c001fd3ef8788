"""`python -m memprobe ...`: the same command line as the `memprobe` console script."""

import sys

from memprobe.cli import main

sys.exit(main())
