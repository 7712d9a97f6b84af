"""Signal handlers that unwind by raising, and that do not lose the signal where Python drops an exception.

An exception raised inside ``__del__`` or a weakref callback is printed ("Exception ignored in ...") and dropped;
a SIGTERM landing there would let a build run on and publish its folder. Such a handler sends the signal again a
moment later, when ordinary code runs.
"""
from __future__ import annotations

import os
import threading
from typing import Callable


def in_finalizer(frame) -> bool:
    """Whether the code a signal interrupted runs inside an object's finalizer, where an exception is dropped."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or (code.co_name == "__call__" and code.co_filename.endswith("weakref.py")):
            return True
        frame = frame.f_back
    return False


def raising(make_exception: Callable[[], BaseException]):
    """A signal handler that raises ``make_exception()``, or, inside a finalizer, sends the signal again later."""

    def handler(signum, frame):
        if in_finalizer(frame):
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        raise make_exception()

    return handler
