"""Strict readers of the formats the agent writes, for the injection tests.

systemd unit files are read by a Python reimplementation of systemd's own rules (config_parse()
in src/shared/conf-parser.c, extract_first_word() with EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE for
command lines, specifier and $VAR expansion), because systemd-analyze verify only says whether a
unit loads, not what a value became. The cron line is read as cron (percent signs) then sh does.
"""

from __future__ import annotations

import re
import shlex

# --- systemd ----------------------------------------------------------------------------------


class Unparsable(ValueError):
    """The text is not valid in its format, or holds something its reader would expand."""


def systemd_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, raw value) for every assignment, as systemd reads the file."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.split("\n"):
        if "\r" in raw or "\0" in raw:
            raise Unparsable(f"control character in line {raw!r}")
        line = raw
        if pending:
            # A comment line inside a continuation is skipped (systemd >= 253 does; older
            # versions join it; either way a value must not end in a backslash).
            if line.lstrip().startswith(("#", ";")):
                continue
            line = pending + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]"):
                raise Unparsable(f"bad section header {stripped!r}")
            section = stripped[1:-1]
            continue
        if "=" not in stripped:
            raise Unparsable(f"missing '=' in {stripped!r}")
        key, _, value = stripped.partition("=")
        entries.append((section, key.strip(), value.strip()))
    if pending:
        raise Unparsable("file ends in a continuation")
    return entries


def systemd_value(entries: list[tuple[str, str, str]], section: str, key: str) -> str:
    values = [v for s, k, v in entries if s == section and k == key]
    if len(values) != 1:
        raise AssertionError(f"[{section}] {key}= given {len(values)} times")
    return values[0]


_C_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}


def specifiers(value: str) -> str:
    """%% is a percent sign; any other specifier would be replaced by systemd: refused."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "%":
            if value[i : i + 2] != "%%":
                raise Unparsable(f"systemd specifier in {value!r}")
            out.append("%")
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def systemd_exec(value: str) -> list[str]:
    """An ExecStart= value as the argv systemd runs (no prefixes, no $VAR, no specifiers)."""
    if value[:1] in "@-:+!":
        raise Unparsable(f"ExecStart prefix in {value!r}")
    words: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t\n":
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote = ""
        while i < n:
            ch = value[i]
            if quote:
                if ch == quote:
                    quote = ""
                    i += 1
                    continue
            elif ch in "\"'":
                quote = ch
                i += 1
                continue
            elif ch in " \t\n":
                break
            if ch == "\\":
                i += 1
                if i >= n:
                    raise Unparsable(f"trailing backslash in {value!r}")
                esc = value[i]
                if esc in _C_ESCAPES:
                    word.append(_C_ESCAPES[esc])
                    i += 1
                elif esc == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", value[i + 1 : i + 3]):
                    word.append(chr(int(value[i + 1 : i + 3], 16)))
                    i += 3
                else:
                    raise Unparsable(f"unknown escape \\{esc} in {value!r}")
                continue
            if ch == "$":
                if value[i : i + 2] == "$$":
                    word.append("$")
                    i += 2
                    continue
                if re.match(r"\$(\{)?[A-Za-z_]", value[i:]):
                    raise Unparsable(f"environment variable expansion in {value!r}")
            word.append(ch)
            i += 1
        if quote:
            raise Unparsable(f"unterminated quote in {value!r}")
        words.append(specifiers("".join(word)))


# --- cron -------------------------------------------------------------------------------------


def cron_command(line: str, log_file: str) -> list[str]:
    """The argv sh runs for a /etc/cron.d line ending in `>>LOG 2>&1`, the redirection dropped."""
    fields = line.split(None, 6)
    if len(fields) != 7:
        raise Unparsable(f"not a cron.d line: {line!r}")
    command = fields[6]
    # cron: an unescaped % ends the command (the rest is stdin); \\% is a percent sign.
    out, i = [], 0
    while i < len(command):
        if command[i] == "\\" and command[i + 1 : i + 2] == "%":
            out.append("%")
            i += 2
            continue
        if command[i] == "%":
            raise Unparsable(f"unescaped % in cron command {command!r}")
        out.append(command[i])
        i += 1
    text = "".join(out)
    suffix = f" >>{log_file} 2>&1"
    if not text.endswith(suffix):
        raise Unparsable(f"cron command does not end in {suffix!r}: {text!r}")
    text = text[: -len(suffix)]
    # sh: only plain characters, '...' and "..." without $ ` \\ in it; anything else (;, |, $,
    # a backtick, a redirection) would act.
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "'\"":
            end = text.find(ch, i + 1)
            if end < 0 or (ch == '"' and re.search(r"[$`\\]", text[i + 1 : end])):
                raise Unparsable(f"shell quoting in {text!r}")
            i = end + 1
        elif re.fullmatch(r"[A-Za-z0-9_@%+=:,./ -]", ch):
            i += 1
        else:
            raise Unparsable(f"shell syntax {ch!r} in {text!r}")
    return shlex.split(text)
