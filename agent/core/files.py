"""Files on the host: rendered from units/, compared with what is there, written atomically.

In check mode (plan) nothing is written; the would-be change is recorded as a unified diff.

Directories: the agent sets mode and owner only on directories that are its own. Its fixed
paths (/var/lib/devpi-agent, /etc/devpi-server, /etc/caddy/tls) are; a configured directory
(devpi.home, backup.dir, ...) is when the agent made it, which it writes down in OWNED_DIRS
before the mkdir, so a run killed in between still knows it next time. The parent of a
configured file is made if missing and otherwise never changed (/etc for a file in /etc).
"""

from __future__ import annotations

import contextlib
import difflib
import grp
import hashlib
import os
import pwd
import re
import shlex
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import jinja2

from agent.core.resources import units_dir

# Directories the agent made for configured paths, one path a line.
OWNED_DIRS = Path("/var/lib/devpi-agent/owned-dirs")
_OWNED_DIRS_LOCK = threading.Lock()


class DirectoryNotOwned(Exception):
    """A configured directory exists, the agent did not make it, and it is not as wanted."""


@dataclass(frozen=True)
class FileChange:
    path: Path
    diff: str
    # What it is, as a step's change reads: "write /etc/caddy/Caddyfile", "remove ...".
    what: str = ""


# --- quoting for each format the templates write ---------------------------------------------
# The config is validated so that none of these ever needs to quote; they are the second line:
# a value goes in as exactly one token of its format, or rendering fails (Unrepresentable).


class Unrepresentable(ValueError):
    """A value the target format cannot hold as one plain value."""


def _check_printable(value: str, fmt: str) -> str:
    if not value or any(not ch.isprintable() for ch in value):
        raise Unrepresentable(f"{value!r} cannot go into a {fmt} (empty, or a control character)")
    return value


_CADDY_BARE = re.compile(r"[A-Za-z0-9._:/@+%$\[\]*=,~!-]+")


def caddy_token(value: object, *, inside_quotes: bool = False) -> str:
    """One Caddyfile token (or, inside_quotes, a part of a quoted one). Caddy replaces {$VAR}
    and {placeholders} even inside quotes, a backslash only escapes a quote, and Caddy trims
    blanks from some values (a site's host): values with braces, backslashes or blanks are
    refused."""
    text = _check_printable(str(value), "Caddyfile")
    if any(ch in "{}\\" or ch.isspace() for ch in text):
        raise Unrepresentable(f"{text!r} cannot go into a Caddyfile (braces, \\ or blanks)")
    if inside_quotes:
        return text.replace('"', '\\"')
    if _CADDY_BARE.fullmatch(text):
        return text
    return '"' + text.replace('"', '\\"') + '"'


def systemd_value(value: object) -> str:
    """A plain unit-file value (Description=, OnCalendar=): one line, specifiers escaped."""
    text = _check_printable(str(value), "systemd unit")
    if text.endswith("\\"):
        raise Unrepresentable(f"{text!r} would continue onto the next line of a systemd unit")
    return text.replace("%", "%%")


_SYSTEMD_BARE = re.compile(r"[A-Za-z0-9._/+@:,=-]+")


def systemd_word(value: object) -> str:
    """One word of an ExecStart= command line: quoted and C-escaped, $ and % doubled."""
    text = str(value)
    if _SYSTEMD_BARE.fullmatch(text):
        return text
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "%$":
            out.append(ch * 2)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def ini_value(value: object) -> str:
    """A value in supervisor's INI: % doubled (its %(here)s expansion); no inline comment."""
    text = _check_printable(str(value), "supervisor INI")
    if text != text.strip() or re.search(r"\s[;#]", text):
        raise Unrepresentable(f"{text!r} cannot go into supervisor's INI (comment or blanks)")
    return text.replace("%", "%%")


def shell_word(value: object) -> str:
    """One word for sh (and supervisor's command=, split like sh)."""
    return shlex.quote(_check_printable(str(value), "command line"))


def supervisor_env(value: object) -> str:
    """A value of supervisor's environment=: in double quotes, which it reads with no escapes."""
    text = ini_value(value)
    if '"' in text or text.startswith("'") or text.endswith("'"):
        raise Unrepresentable(f"{text!r} cannot go into supervisor's environment= (quotes)")
    return f'"{text}"'


def cron_word(value: object) -> str:
    """One word of a cron.d command: sh-quoted, and cron's % (the job's stdin) escaped."""
    return shell_word(value).replace("%", "\\%")


# A plain YAML scalar that can only be read as this string: a path or an http(s) URL (not
# ending in ":", which would make it a mapping key).
_YAML_PLAIN = re.compile(r"(?:/|https?://)[A-Za-z0-9._/:@+\[\]%~-]*(?<!:)")


def _yaml_printable(code: int) -> bool:
    # YAML's printable set, less what YAML 1.1 readers take as line breaks or a byte-order mark.
    return (
        0x20 <= code <= 0x7E
        or (0xA0 <= code <= 0xD7FF and code not in (0x2028, 0x2029))
        or (0xE000 <= code <= 0xFFFD and code != 0xFEFF)
        or code >= 0x10000
    )


def yaml_scalar(value: object) -> str:
    """A YAML string scalar: plain when nothing in it is YAML syntax, else double-quoted."""
    text = str(value)
    if _YAML_PLAIN.fullmatch(text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif _yaml_printable(code):
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


FILTERS = {
    "caddy": caddy_token,
    "systemd": systemd_value,
    "systemd_word": systemd_word,
    "ini": ini_value,
    "supervisor_env": supervisor_env,
    "shell": shell_word,
    "cron": cron_word,
    "yaml": yaml_scalar,
}


_ENVIRONMENT_OPTIONS: dict[str, Any] = {
    "undefined": jinja2.StrictUndefined,
    "keep_trailing_newline": True,
    "trim_blocks": True,
    "lstrip_blocks": True,
    "autoescape": False,
}
# Where apply and plan keep the templates jinja compiled (compiling the six a no-op renders took
# 0.02 s of it), beside the agent's unpacked code: root's alone, as that is (it is code).
TEMPLATE_CACHE = Path("/var/cache/devpi-agent/jinja")
_template_cache: list[Path] = []


def cache_compiled_templates(directory: Path = TEMPLATE_CACHE) -> None:
    """From now on, keep compiled templates in `directory` if root owns it alone (made 0700
    if missing); otherwise, or not as root, compile every time as before."""
    try:
        if os.geteuid() != 0:
            return
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (directory, directory.parent):
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                return
        if stat.S_IMODE(directory.lstat().st_mode) & 0o077:
            return
    except OSError:
        return
    _template_cache[:] = [directory]
    _templates.cache_clear()


@cache
def _templates() -> jinja2.Environment:
    bytecode_cache = None
    if _template_cache:
        # jinja keys a compiled template on its name and source only: the options that shape
        # the compiled code name the files too.
        options = repr(sorted((k, repr(v)) for k, v in _ENVIRONMENT_OPTIONS.items()))
        tag = hashlib.sha256(options.encode()).hexdigest()[:12]
        bytecode_cache = jinja2.FileSystemBytecodeCache(
            str(_template_cache[0]), pattern=f"{tag}-%s.cache"
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(units_dir())),
        bytecode_cache=bytecode_cache,
        **_ENVIRONMENT_OPTIONS,
    )
    env.filters.update(FILTERS)
    return env


def render(template: str, **variables: Any) -> str:
    """Render units/<template> with the given variables; a missing variable is an error."""
    return _templates().get_template(template).render(**variables)


class Ownership(NamedTuple):
    uid: int
    gid: int


def lookup_owner(owner: str, group: str) -> Ownership:
    return Ownership(pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)


class Files:
    """Every file the agent writes goes through here."""

    def __init__(self, *, check: bool = False, root: Path = Path("/"), chown: bool = True) -> None:
        self.check = check
        self.root = root
        self.chown = chown
        self.changes: list[FileChange] = []
        # Every recorded change is also reported here (Context makes it a change of the step
        # that runs): one accounting path, so no diff belongs to a step that reports ok.
        self.on_change: Callable[[FileChange], None] | None = None

    def fork(self) -> Files:
        """The same host, with a change list of its own: for a step that runs beside others."""
        return Files(check=self.check, root=self.root, chown=self.chown)

    def _record(self, change: FileChange) -> None:
        self.changes.append(change)
        if self.on_change is not None:
            self.on_change(change)

    def host_path(self, path: Path) -> Path:
        """Where `path` (absolute, as on the host) really is; tests point root at a temp dir."""
        return self.root / path.relative_to("/")

    def read(self, path: Path) -> str | None:
        try:
            return self.host_path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def exists(self, path: Path) -> bool:
        return self.host_path(path).exists()

    def _owner(self, owner: str, group: str) -> Ownership | None:
        if not self.chown:
            return None
        try:
            return lookup_owner(owner, group)
        except KeyError:
            if self.check:
                # The user may be created by an earlier step of the same run.
                return None
            raise

    def ensure_file(
        self,
        path: Path,
        content: str | bytes,
        *,
        mode: int,
        owner: str = "root",
        group: str = "root",
        secret: bool = False,
        record: bool = True,
    ) -> bool:
        """Make `path` hold exactly `content` with this owner and mode; True if it changed.

        record=False is for the agent's own scratch files, which are no change to report.
        """
        data = content.encode() if isinstance(content, str) else content
        real = self.host_path(path)
        wanted_owner = self._owner(owner, group)
        try:
            current = real.read_bytes()
            st = real.stat()
        except FileNotFoundError:
            current, st = None, None
        content_differs = current != data
        meta_differs = st is not None and (
            stat.S_IMODE(st.st_mode) != mode
            or (wanted_owner is not None and (st.st_uid, st.st_gid) != wanted_owner)
        )
        if not content_differs and not meta_differs:
            return False
        if record:
            what = f"write {path}" if content_differs else f"set mode {mode:04o} of {path}"
            diff = _describe_change(path, current, data, st, mode, secret=secret)
            self._record(FileChange(path, diff, what))
        if not self.check:
            if content_differs:
                atomic_write(real, data, mode=mode, owner=wanted_owner)
            else:
                if wanted_owner is not None:
                    os.chown(real, wanted_owner.uid, wanted_owner.gid)
                os.chmod(real, mode)
        return True

    def ensure_dir(
        self,
        path: Path,
        *,
        mode: int,
        owner: str = "root",
        group: str = "root",
        key: str | None = None,
        record: bool = True,
    ) -> bool:
        """Make `path` a directory with this mode and owner; True if anything changed.
        record=False is for the agent's own scratch directories (no change to report).

        key=None: one of the agent's fixed directories, always its own. key="backup.dir" etc.:
        a configured directory: made if missing; an existing one is changed only if the agent
        made it, taken as it is when it already has this mode and owner, refused otherwise
        (DirectoryNotOwned): it may be a directory other programs rely on.
        """
        st = self._dir_stat(path)
        if key is not None and st is not None and not self._owns(path):
            if self._dir_as_wanted(st, mode, owner, group):
                self._record_owned(path)  # the operator made it for this: from now on ours
                return False
            raise DirectoryNotOwned(
                f"{key}: {path} exists and devpi-agent did not make it; it is "
                f"{_owner_name(st)} {stat.S_IMODE(st.st_mode):04o}, not {owner}:{group} "
                f"{mode:04o}. The agent changes mode and owner only of directories it made: "
                "chown and chmod it yourself if it is meant for this, or name a path that "
                "does not exist yet"
            )
        if key is not None and st is None:
            self._record_owned(path)
        return self._converge_dir(path, st, mode=mode, owner=owner, group=group, record=record)

    def ensure_parent(
        self, path: Path, *, mode: int, owner: str = "root", group: str = "root"
    ) -> bool:
        """The directory a configured file goes in: made (and then the agent's) if missing;
        an existing one the agent did not make is left exactly as it is (/etc stays /etc)."""
        directory = path.parent
        st = self._dir_stat(directory)
        if st is not None and not self._owns(directory):
            return False
        if st is None:
            self._record_owned(directory)
        return self._converge_dir(directory, st, mode=mode, owner=owner, group=group)

    def _dir_stat(self, path: Path) -> os.stat_result | None:
        try:
            st = self.host_path(path).stat()
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"{path} exists and is not a directory")
        return st

    def _dir_as_wanted(self, st: os.stat_result, mode: int, owner: str, group: str) -> bool:
        wanted_owner = self._owner(owner, group)
        same_owner = wanted_owner is None or (st.st_uid, st.st_gid) == wanted_owner
        return stat.S_IMODE(st.st_mode) == mode and same_owner

    def owned_dirs(self) -> set[Path]:
        return {Path(line) for line in (self.read(OWNED_DIRS) or "").splitlines() if line}

    def _owns(self, path: Path) -> bool:
        return Path(os.path.normpath(path)) in self.owned_dirs()

    def _record_owned(self, path: Path) -> None:
        """Written (and synced) before the mkdir: a killed run's directory is still ours."""
        if self.check:
            return
        # A read-modify-write of one file, and steps may run side by side (core/engine.py).
        with _OWNED_DIRS_LOCK:
            owned = self.owned_dirs() | {Path(os.path.normpath(path))}
            data = "".join(f"{p}\n" for p in sorted(owned, key=str)).encode()
            real = self.host_path(OWNED_DIRS)
            real.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(real, data, mode=0o600, owner=None)

    def _converge_dir(
        self,
        path: Path,
        st: os.stat_result | None,
        *,
        mode: int,
        owner: str,
        group: str,
        record: bool = True,
    ) -> bool:
        if st is not None and self._dir_as_wanted(st, mode, owner, group):
            return False
        wanted_owner = self._owner(owner, group)
        real = self.host_path(path)
        what = "create" if st is None else f"set mode {mode:04o} / owner {owner}:{group}"
        summary = f"make directory {path}" if st is None else f"{what} of directory {path}"
        if record:
            self._record(FileChange(path, f"directory {path}: {what}\n", summary))
        if not self.check:
            real.mkdir(parents=True, exist_ok=True)
            if wanted_owner is not None:
                os.chown(real, wanted_owner.uid, wanted_owner.gid)
            os.chmod(real, mode)
        return True

    def remove(self, path: Path, *, record: bool = True) -> bool:
        real = self.host_path(path)
        if not real.exists():
            return False
        if record:
            self._record(FileChange(path, f"remove {path}\n", f"remove {path}"))
        if not self.check:
            real.unlink()
            fsync_dir(real.parent)
        return True


def _owner_name(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def atomic_write(path: Path, data: bytes, *, mode: int, owner: Ownership | None) -> None:
    """Temp file in the same directory, owner and mode set before any byte lands, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_change(
    path: Path,
    current: bytes | None,
    wanted: bytes,
    st: os.stat_result | None,
    mode: int,
    *,
    secret: bool,
) -> str:
    lines: list[str] = []
    if st is not None and stat.S_IMODE(st.st_mode) != mode:
        lines.append(f"mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}\n")
    if current == wanted:
        return "".join(lines) or f"owner of {path} changes\n"
    if secret:
        lines.append(f"{path}: secret content {'created' if current is None else 'changed'}\n")
        return "".join(lines)
    before = current.decode("utf-8", "replace").splitlines(keepends=True) if current else []
    after = wanted.decode("utf-8", "replace").splitlines(keepends=True)
    lines.extend(
        difflib.unified_diff(
            before,
            after,
            fromfile="/dev/null" if current is None else str(path),
            tofile=str(path),
        )
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)
