"""Where Ray's messages in the gateway's own process go: a file in Ray's session log directory, not the terminal.

Ray Serve's driver-side logger prints every step at INFO on the terminal ("Started Serve", "Connecting to existing
Serve app…", "Application 'tpgate' is ready at …/", "Deleting app …"), which buries tpgate's own lines and reads
like trouble when it is routine. While the gateway runs, the ``ray`` and ``ray.serve`` loggers write to
``<session>/logs/tpgate-<pid>.log`` and the terminal keeps only their errors. Ray's other processes (Serve's
controller and replicas, the engines they supervise) already log under the same directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.serve")  # neither propagates to the root logger
TERMINAL_LEVEL = logging.ERROR
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s"


def session_logs_dir() -> Path:
    """The log directory of the Ray session this process is connected to (a temporary directory if Ray cannot
    say, which does not happen with a connected driver)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return Path(tempfile.gettempdir())
    return Path(node.get_logs_dir_path())


@contextlib.contextmanager
def ray_logs_to(path: Path) -> Iterator[Path]:
    """For the block, the ``ray`` and ``ray.serve`` loggers of this process write to ``path`` (appended), and their
    terminal handlers pass only errors. Call it after ``ray.init`` (which sets up the ``ray`` logger afresh)."""
    import ray.serve  # noqa: F401  # configures the ray.serve logger on import: do that before adjusting it

    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    restore: dict[logging.Handler, int] = {}  # a handler may serve several of the loggers: its level once
    loggers = [logging.getLogger(name) for name in RAY_LOGGERS]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                restore.setdefault(handler, handler.level)
                handler.setLevel(max(restore[handler], TERMINAL_LEVEL))
        logger.addHandler(file_handler)
    try:
        yield path
    finally:
        for logger in loggers:
            logger.removeHandler(file_handler)
        for handler, level in restore.items():
            handler.setLevel(level)
        file_handler.close()


def driver_log_path() -> Path:
    return session_logs_dir() / f"tpgate-{os.getpid()}.log"
