"""`apply` and `plan`: load the config, take the run lock, run every step, print the recap.

Loaded only when one of them runs, so `devpi-agent version` and the day-2 commands start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from agent import __version__
from agent.commands.support import (
    EXIT_CANNOT_START,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    config_option,
    host_context,
    require_root,
)
from agent.core import log
from agent.core.config import Config, ConfigError, load
from agent.core.engine import LOCK_FILE, LockTimeout, RunReport, run_steps, single_run
from agent.core.files import Files, cache_compiled_templates
from agent.core.log import redactor
from agent.core.status import write_status
from agent.steps import STEPS


def _load_or_exit(path: Path) -> Config:
    try:
        config = load(path)
    except ConfigError as error:
        click.echo(f"devpi-agent: invalid config: {error}", err=True)
        click.echo("nothing was changed on this host", err=True)
        sys.exit(EXIT_CONFIG)
    for user in config.users:
        redactor.add(user.password, user=user.name)
    return config


def _converge(config: Config, *, check: bool, verbose: bool, lock_timeout: float) -> RunReport:
    log.configure(verbose=verbose)
    logger = log.get()
    if not check:
        cache_compiled_templates()  # plan leaves even the agent's cache as it was
    ctx = host_context(config, check=check)
    logger.info(
        "plan" if check else "apply",
        version=__version__,
        config=str(config.path),
        os=ctx.os.pretty,
        systemd=ctx.systemd,
    )
    try:
        with single_run(LOCK_FILE, lock_timeout):
            report = run_steps(ctx, STEPS)
    except LockTimeout as error:
        logger.error("locked", error=str(error))
        click.echo(f"devpi-agent: {error}", err=True)
        sys.exit(EXIT_CANNOT_START)
    if not check:
        record_apply(ctx.files, report)
    logger.info(
        "recap",
        ok=report.count("ok"),
        changed=report.count("changed"),
        failed=report.count("failed"),
        skipped=report.skipped,
        seconds=round(report.seconds, 3),
    )
    return report


def record_apply(files: Files, report: RunReport) -> None:
    """status/apply.json: the last apply's result, for the metrics exporter and monitoring."""
    failed = next((step for step in report.steps if step.status == "failed"), None)
    write_status(
        files,
        "apply",
        ok=failed is None,
        changed=report.count("changed"),
        failed_step=failed.name if failed else None,
        seconds=round(report.seconds, 3),
    )


def _print_steps(report: RunReport, *, verb: str, diffs: bool) -> None:
    """Each step's changes in order, each file change followed by its diff (as Ansible's
    --diff does per task)."""
    for step in report.steps:
        pending = list(step.file_changes) if diffs else []
        for change in step.changes:
            click.echo(f"{step.name}: {verb}{change}")
            for file_change in [fc for fc in pending if str(fc.path) in change]:
                click.echo(redactor(file_change.diff), nl=False)
                pending.remove(file_change)
        for file_change in pending:
            click.echo(redactor(file_change.diff), nl=False)


def _finish(report: RunReport) -> NoReturn:
    sys.exit(EXIT_FAILED if report.failed else EXIT_OK)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document; logs go to stderr.")
@click.option(
    "--diff", "show_diff", is_flag=True, help="Show a unified diff of every file changed."
)
@click.option(
    "--lock-timeout",
    type=float,
    default=300,
    show_default=True,
    help="Seconds to wait for another run to finish.",
)
@click.pass_context
def apply(
    ctx: click.Context, config_path: Path, as_json: bool, show_diff: bool, lock_timeout: float
) -> None:
    """Converge this host to the config; a second run changes nothing."""
    config = _load_or_exit(config_path)
    require_root("apply")
    report = _converge(config, check=False, verbose=ctx.obj["verbose"], lock_timeout=lock_timeout)
    if as_json:
        click.echo(json.dumps(report.as_json()))
    else:
        if show_diff:
            _print_steps(report, verb="", diffs=True)
        _print_summary(report)
    _finish(report)


@click.command()
@config_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document (each step's status and what it would change; no diffs).",
)
@click.option("--lock-timeout", type=float, default=300, show_default=True)
@click.pass_context
def plan(ctx: click.Context, config_path: Path, as_json: bool, lock_timeout: float) -> None:
    """Show what apply would change, with diffs of the files; changes nothing."""
    config = _load_or_exit(config_path)
    require_root("plan")
    report = _converge(config, check=True, verbose=ctx.obj["verbose"], lock_timeout=lock_timeout)
    if as_json:
        click.echo(redactor(json.dumps(report.as_json(changes=True))))
    else:
        _print_steps(report, verb="would ", diffs=True)
        _print_summary(report)
    _finish(report)


def _print_summary(report: RunReport) -> None:
    for step in report.steps:
        if step.error:
            click.echo(f"{step.name}: FAILED: {redactor(step.error)}")
    click.echo(report.recap())
