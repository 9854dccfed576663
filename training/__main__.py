"""`python -m training train ...` (and `torchrun --nproc_per_node N -m training train ...`)."""

import sys

from training.cli import main

sys.exit(main())
