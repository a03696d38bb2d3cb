"""ShRunner against real short-lived processes (true, sh, cat, sleep): exit codes, captured
output, input on stdin, and the timeout that kills."""

from __future__ import annotations

import time

from agent.core.runner import ShRunner


def test_captures_both_streams_and_the_exit_code() -> None:
    result = ShRunner().run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_input_goes_to_stdin() -> None:
    assert ShRunner().run(["cat"], input="on stdin\n").stdout == "on stdin\n"


def test_a_signal_is_a_negative_exit_code() -> None:
    assert ShRunner().run(["sh", "-c", "kill -TERM $$"], check=False).returncode == -15


def test_a_command_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    result = ShRunner().run(["sh", "-c", "echo before; exec sleep 30"], timeout=0.5, check=False)
    assert result.returncode == -9
    assert result.stdout == "before\n"
    assert time.monotonic() - started < 10  # killed, not waited out


def test_missing_program_is_127() -> None:
    result = ShRunner().run(["no-such-program-devpi-agent"], check=False)
    assert result.returncode == 127
