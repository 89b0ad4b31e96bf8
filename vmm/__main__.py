import os
import sys

if "PYVMM_CPR_EXEC_STATE" in os.environ or "PYVMM_CPR_EXEC_CHECK" in os.environ:
    # The new image of a cpr-exec live update (or its dry run): take the lean path
    # straight to restoring the guest (every millisecond here is guest downtime),
    # whatever the command line says; it may name a new --console and --qmp.
    from .runner import exec_entry
    sys.exit(exec_entry(sys.argv[1:]))

from .cli import main

sys.exit(main())
