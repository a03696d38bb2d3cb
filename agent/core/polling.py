"""One bounded wait for everything the agent waits on (a port, a program, devpi's API)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    ready: Callable[[], bool], timeout: float, *, first: float = 0.1, most: float = 0.25
) -> bool:
    """Call `ready` until it is true or `timeout` seconds have passed; whether it became true.
    The pause between looks starts at `first` and grows by half up to `most`."""
    deadline = time.monotonic() + timeout
    delay = first
    while True:
        if ready():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 1.5, most)
