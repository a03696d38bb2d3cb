"""devpi-agent: converge a host into a private PyPI server (devpi behind Caddy)."""

__version__ = "0.1.0"
