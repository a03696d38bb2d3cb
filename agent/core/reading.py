"""Reading a file a person named (a config key, a TLS setting): its bytes, or why not.

Config raises ConfigError and the TLS checks raise TlsProblem, so the caller says how to raise;
the reason (missing, unreadable, a directory, any other error) is worded here once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class FileRead(NamedTuple):
    data: bytes
    mode: int  # the permission bits, of the file `data` came from


def read_file(
    what: str, path: Path, fail: Callable[[str], Exception], *, denied: str = ""
) -> FileRead:
    """`path`'s bytes and mode from one open: a file swapped after the read cannot pass a check
    made on its mode or bytes. Otherwise raises `fail("<what> <path> <why not>")`; `denied` is
    added to the reason when permission is denied (a hint such as " (run as root?)")."""
    try:
        with path.open("rb") as handle:
            return FileRead(handle.read(), stat.S_IMODE(os.fstat(handle.fileno()).st_mode))
    except FileNotFoundError:
        reason = "does not exist"
    except PermissionError:
        reason = f"is not readable{denied}"
    except IsADirectoryError:
        reason = "is a directory"
    except OSError as error:
        reason = f"cannot be read: {error.strerror or error}"
    except ValueError as error:  # a NUL in the path
        reason = f"cannot be read: {error}"
    raise fail(f"{what} {path} {reason}") from None
