"""A logger that imports `logging` only when something is logged.

`logging` costs milliseconds to import, and a cpr-exec'd image imports the
device modules on the live update's critical path, where it logs nothing.
"""


class LazyLogger:
    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        import logging
        return getattr(logging.getLogger(self.name), attr)


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
