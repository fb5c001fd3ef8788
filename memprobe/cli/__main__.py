"""`python -m memprobe.cli ...` (as the tests and torchrun launch it): the `memprobe` command."""

import sys

from memprobe.cli import main

sys.exit(main())
