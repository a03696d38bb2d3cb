"""restic, for backups that leave the host (backup.remote).

Every call runs through the runner with the repository, its password file and the env file's
variables (cloud keys) in restic's environment: argv holds only the action, tags and paths, so
no secret reaches `ps` or a log. A failure raises RemoteFailed with what went wrong in a
person's words (wrong password, remote unreachable, remote full) and restic's last lines.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.config import BackupConfig, sftp_target
from agent.core.context import Context, StepFailed
from agent.core.runner import Result

CACHE_DIR = Path("/var/cache/devpi-agent/restic")
TAG = "devpi-agent"
# A timer must never wait on a prompt or a dead connection for long.
SSH_CONNECT_TIMEOUT = 30


class RemoteFailed(StepFailed):
    """restic failed; the message names the problem."""


@dataclass(frozen=True)
class Snapshot:
    id: str
    short_id: str
    time: str
    paths: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Pushed:
    snapshot: str
    bytes_added: int
    bytes_processed: int
    seconds: float


def environment(settings: BackupConfig) -> dict[str, str]:
    """restic's environment: where the repository is and how to open it (the secrets)."""
    assert settings.remote is not None and settings.remote_password_file is not None
    return {
        **dict(settings.remote_env),
        "RESTIC_REPOSITORY": settings.remote,
        "RESTIC_PASSWORD_FILE": str(settings.remote_password_file),
        "RESTIC_CACHE_DIR": str(CACHE_DIR),
        "HOME": "/root",
    }


def options(settings: BackupConfig) -> list[str]:
    """restic's global options: for sftp, the ssh command (key, known hosts, never a prompt)."""
    assert settings.remote is not None
    if not settings.remote.startswith("sftp:"):
        return []
    host, port, _ = sftp_target(settings.remote)
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}"]
    ssh += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if port is not None:
        ssh += ["-p", str(port)]
    if settings.remote_ssh_key_file is not None:
        ssh += ["-i", str(settings.remote_ssh_key_file), "-o", "IdentitiesOnly=yes"]
    if settings.remote_known_hosts_file is not None:
        ssh += ["-o", f"UserKnownHostsFile={settings.remote_known_hosts_file}"]
        ssh += ["-o", "StrictHostKeyChecking=yes"]
    ssh += [host, "-s", "sftp"]
    return ["-o", f"sftp.command={shlex.join(ssh)}"]


def explain(result: Result, doing: str) -> str:
    """What went wrong, for a person, from restic's output."""
    text = f"{result.stderr}\n{result.stdout}".lower()
    if "wrong password" in text or "no key found" in text:
        problem = "wrong repository password (backup.remote_password_file)"
    elif "no space left" in text or "enospc" in text or "quota" in text:
        problem = "the remote is full (no space left on it)"
    elif "ssh_fx_failure" in text:
        # OpenSSH's sftp-server reports ENOSPC and EDQUOT as a bare "Failure".
        problem = (
            "the remote refused a write (SSH_FX_FAILURE: with OpenSSH, usually its disk is full)"
        )
    elif any(
        words in text
        for words in (
            "connection refused",
            "connection timed out",
            "no route to host",
            "could not resolve",
            "name or service not known",
            "unable to start the sftp session",
            "host key verification failed",
            "permission denied (publickey",
            "dial tcp",
            "i/o timeout",
            "no such host",
        )
    ):
        problem = "the remote cannot be reached"
    elif result.returncode == -9:
        problem = "restic timed out"
    else:
        problem = f"restic exited {result.returncode}"
    return f"remote backup: {doing} failed: {problem}:\n{result.tail(6)}"


def _run(
    ctx: Context, args: list[str], doing: str, *, timeout: float, check: bool = True
) -> Result:
    settings = ctx.config.backup
    result = ctx.runner.run(
        ["restic", *options(settings), *args],
        env=environment(settings),
        timeout=timeout,
        check=False,
        progress=f"restic {args[0]}",
    )
    if check and not result.ok:
        raise RemoteFailed(explain(result, doing))
    return result


def ensure_repository(ctx: Context) -> bool:
    """Open the repository, creating it the first time; True if it was created."""
    ctx.files.host_path(CACHE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    probe = _run(ctx, ["cat", "config"], "opening the repository", timeout=300, check=False)
    if probe.ok:
        # A push killed halfway leaves its lock; restic removes only stale ones (dead process).
        _run(ctx, ["unlock"], "removing stale locks", timeout=300, check=False)
        return False
    text = probe.stderr.lower()
    missing = "is there a repository at the following location" in text or (
        "unable to open config file" in text and "no such file" in text
    )
    if not missing:
        raise RemoteFailed(explain(probe, "opening the repository"))
    created = _run(ctx, ["init"], "creating the repository", timeout=600, check=False)
    if not created.ok and "already exists" not in created.stderr:
        raise RemoteFailed(explain(created, "creating the repository"))
    return True


def push(ctx: Context, directory: Path, name: str) -> Pushed:
    """Back up the finished export `directory` (tagged with its name), then apply remote_keep."""
    ensure_repository(ctx)
    result = _run(
        ctx,
        ["backup", "--json", "--tag", TAG, "--tag", name, str(directory)],
        "uploading the backup",
        timeout=6 * 3600,
    )
    summary: dict[str, Any] = {}
    for line in result.stdout.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("message_type") == "summary":
            summary = message
    if not summary.get("snapshot_id"):
        raise RemoteFailed(f"remote backup: restic reported no snapshot:\n{result.tail(6)}")
    forget(ctx)
    return Pushed(
        str(summary["snapshot_id"]),
        int(summary.get("data_added", 0)),
        int(summary.get("total_bytes_processed", 0)),
        float(summary.get("total_duration", result.seconds)),
    )


def forget(ctx: Context) -> None:
    """Keep the newest backup.remote_keep snapshots of the agent's, prune the rest."""
    keep = str(ctx.config.backup.remote_keep)
    _run(
        ctx,
        ["forget", "--tag", TAG, "--group-by", "", "--keep-last", keep, "--prune"],
        "applying remote_keep",
        timeout=3 * 3600,
    )


def snapshots(ctx: Context) -> list[Snapshot]:
    """The agent's snapshots in the repository, oldest first."""
    result = _run(ctx, ["snapshots", "--json", "--tag", TAG], "listing snapshots", timeout=300)
    try:
        found = json.loads(result.stdout or "[]") or []
    except ValueError:
        raise RemoteFailed(
            f"remote backup: restic snapshots printed no JSON:\n{result.tail(3)}"
        ) from None
    return [
        Snapshot(
            str(s["id"]),
            str(s.get("short_id", s["id"][:8])),
            str(s.get("time", "")),
            tuple(s.get("paths") or ()),
            tuple(s.get("tags") or ()),
        )
        for s in found
        if isinstance(s, dict) and "id" in s
    ]


def pick(found: list[Snapshot], wanted: str) -> Snapshot:
    """`wanted` ("latest", an ID or its prefix, or a backup's name) among `found`."""
    if not found:
        raise RemoteFailed("remote backup: the repository holds no snapshot of the agent's")
    if wanted == "latest":
        return found[-1]
    matches = [s for s in found if s.id.startswith(wanted) or wanted in s.tags[1:]]
    if len(matches) != 1:
        known = ", ".join(f"{s.short_id} ({s.time[:19]})" for s in found[-5:])
        what = "matches no snapshot" if not matches else "matches more than one snapshot"
        raise RemoteFailed(f"remote backup: {wanted!r} {what}; the newest: {known}")
    return matches[0]


def restore(ctx: Context, snapshot: Snapshot, target: Path) -> Path:
    """Restore `snapshot` under `target`; the directory holding the export."""
    if len(snapshot.paths) != 1:
        raise RemoteFailed(f"remote backup: snapshot {snapshot.short_id} is not one export")
    _run(
        ctx,
        ["restore", snapshot.id, "--target", str(target)],
        f"restoring snapshot {snapshot.short_id}",
        timeout=6 * 3600,
    )
    return target / snapshot.paths[0].lstrip("/")
