"""``python -m unlearn_kernels``: the ``unlearn-kernels`` command."""

import sys

from unlearn_kernels.cli import main

sys.exit(main())
