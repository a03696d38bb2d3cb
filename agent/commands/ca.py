"""`devpi-agent ca`: print the root certificate of Caddy's local CA, for clients to trust.

Only with tls = "internal": with "acme" the certificate chains to a CA clients already trust (or
to the company's ACME CA), with "files" to the company's own CA.
"""

from __future__ import annotations

from pathlib import Path

import click

from agent.commands.support import EXIT_CANNOT_START, EXIT_FAILED, config_option, fail, load_config
from agent.host.x509 import CertificateError, load_pem


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    fail("ca", message, code)


@click.command("ca")
@config_option
def ca(config_path: Path) -> None:
    """Print Caddy's local CA root certificate (PEM; tls = "internal") for clients to trust."""
    from agent.host.caddy import caddy_home
    from agent.host.tls import internal_root

    config = load_config("ca", config_path)
    server = config.server
    if server.tls != "internal":
        source = {
            "acme": f"the ACME CA at {server.acme_ca}" if server.acme_ca else "Let's Encrypt",
            "files": f"the CA that issued {server.cert_file}",
        }[server.tls]
        _fail(
            f'server.tls is "{server.tls}": the certificate comes from {source}, not from '
            f'Caddy\'s local CA; `ca` prints that CA only with tls = "internal"'
        )
    path = internal_root(caddy_home())
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        _fail(
            f"Caddy's local CA does not exist yet ({path}): Caddy creates it when it first "
            f"serves with tls internal; run `devpi-agent apply` first"
        )
        return
    except PermissionError:
        _fail(f"{path} is not readable: run as root (sudo devpi-agent ca)", EXIT_CANNOT_START)
        return
    try:
        load_pem(pem)
    except CertificateError as error:
        _fail(f"{path} is not a PEM certificate: {error}")
    click.echo(pem.decode("ascii", "replace"), nl=False)
