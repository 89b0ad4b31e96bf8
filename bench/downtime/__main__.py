"""`python -m bench.downtime`: the same as `pyvmm bench downtime`."""

import sys

from bench.downtime.sweep import main

sys.exit(main())
