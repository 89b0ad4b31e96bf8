import os
import sys

if "PYVMM_CPR_EXEC_STATE" in os.environ:
    # The new image of a cpr-exec live update: take the lean path straight to
    # restoring the guest (every millisecond here is guest downtime).
    from .runner import resume_after_exec
    sys.exit(resume_after_exec())

from .cli import main

sys.exit(main())
