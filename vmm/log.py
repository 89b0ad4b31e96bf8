"""A logger that imports `logging` only when something is logged.

`logging` costs milliseconds to import, and a cpr-exec'd image imports the
device modules on the live update's critical path, where it logs nothing.
"""

import os


class LazyLogger:
    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        import logging
        return getattr(logging.getLogger(self.name), attr)


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)


def log_safely(logger: LazyLogger, level: str, msg: str, *args, exc_info: bool = False) -> None:
    """Log without ever raising.  The lazy `import logging` needs fds to read its
    files; when the process has none left (EMFILE, maybe the very case being
    reported), fall back to one line on stderr."""
    try:
        getattr(logger, level)(msg, *args, exc_info=exc_info)
    except Exception:
        try:
            os.write(2, f"pyvmm: {msg % args}\n".encode(errors="replace"))
        except Exception:
            pass
