"""Where things live on a host, for every module that needs the same path, and the names of the
pending markers (work a killed run must finish next time: core/context.py's mark_pending).

A path only one module uses stays in that module.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# The agent's own config directory: the config, root's password, the replication CA (root-only).
AGENT_ETC = Path("/etc/devpi-agent")
# The agent's own state: pending markers, memo, records of upgrades in flight.
STATE_DIR = Path("/var/lib/devpi-agent")
PENDING_DIR = STATE_DIR / "pending"
# An export/import upgrade in flight (steps/upgrade.py); the venv step reads it too.
UPGRADE_RECORD = STATE_DIR / "upgrade.json"
# The last result of each kind of run (core/status.py), readable by monitoring.
STATUS_DIR = STATE_DIR / "status"
# The system's CA bundle (Debian's and Ubuntu's ca-certificates).
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# devpi-server's config, written by the devpi-config step, read by devpi's own tools.
DEVPI_CONFIG_DIR = Path("/etc/devpi-server")
DEVPI_CONFIG_FILE = DEVPI_CONFIG_DIR / "devpi-server.yml"

# Where the README installs the agent; used when the running agent cannot tell its own path.
INSTALLED_AGENT = Path("/usr/local/sbin/devpi-agent")

# supervisor: its programs and their logs.
SUPERVISORD_CONF = Path("/etc/supervisor/supervisord.conf")
SUPERVISOR_PROGRAMS_DIR = Path("/etc/supervisor/conf.d")
SUPERVISOR_LOG_DIR = Path("/var/log/supervisor")
DEVPI_PROGRAM = "devpi-server"
DEVPI_LOG = SUPERVISOR_LOG_DIR / "devpi-server.log"

METRICS_PROGRAM = "devpi-agent-metrics"

# Caddy.
CADDYFILE = Path("/etc/caddy/Caddyfile")
CADDY_TLS_DIR = Path("/etc/caddy/tls")

# Pending markers: a change written but not yet in effect.
DEVPI_RESTART = "devpi-server-restart"  # devpi-server reads its config, venv and secret at start
CADDY_RELOAD = "caddy-reload"  # a new Caddyfile or certificate copy not yet loaded
CADDY_RESTART = "caddy-restart"  # a new admin address: a reload would go where nothing listens
VENV_BUILD = "venv-build"  # a venv being (re)built: a killed build is started over
APT_LISTS = "apt-lists"  # package lists half refreshed


def agent_executable() -> Path:
    """The file this agent runs from: pex names it in $PEX; a plain install is on PATH. The
    backup schedule and the metrics exporter run it."""
    pex = os.environ.get("PEX")
    if pex:
        return Path(pex).resolve()
    found = shutil.which("devpi-agent")
    if found:
        return Path(found).resolve()
    argv0 = Path(sys.argv[0])
    if argv0.name == "devpi-agent" and argv0.exists():
        return argv0.resolve()
    return INSTALLED_AGENT
