"""`python -m lorakit ...` (also `torchrun --nproc_per_node N -m lorakit train ...`)."""

import sys

from lorakit.cli import main

sys.exit(main())
