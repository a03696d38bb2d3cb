"""`devpi-agent apply` on a fresh Debian host with real systemd, driven from outside with the
real clients (twine, pip, uv) through Caddy with basic auth; on Debian 12 and 13 (Python 3.11,
and 3.13 whose venv has no setuptools, as on Ubuntu 24.04).

One host is converged once per module and suite; the tests then each check one thing a user
relies on.
"""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from admin_api import assert_locked_out
from agenthost import (
    AGENT,
    CADDY_CA,
    CONFIG,
    DIST,
    PACKAGE,
    USER_PASSWORD,
    ApplyRun,
    ArgvWatcher,
    Ports,
    apply,
    config_text,
    processes,
)
from clients import (
    Site,
    build_wheel,
    http_fetch,
    http_get,
    make_ca_bundle,
    pip_install,
    twine_upload,
    uv_install,
)
from nspawn import NspawnHost, free_port

from agent.steps import STEPS

SUITES = ("bookworm", "trixie")


@dataclass
class Converged:
    host: NspawnHost
    ports: Ports
    first: ApplyRun
    second: ApplyRun
    site: Site
    argv_seen: set[str]
    workdir: Path


@pytest.fixture(scope="module")
def converged(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Converged]:
    assert DIST.exists(), f"{DIST} is missing: run `make dist` first"
    ports = Ports.free()
    workdir = tmp_path_factory.mktemp("clients")
    host = NspawnHost(rootfs)
    try:
        host.prepare()
        host.copy_in(DIST, AGENT, mode=0o755)
        host.write(CONFIG, config_text(ports), mode=0o600)
        host.start(systemd=True)
        with ArgvWatcher() as watcher:
            first = apply(host)
            second = apply(host)
        ca = (
            make_ca_bundle(host.path(CADDY_CA), workdir / "ca-bundle.pem")
            if host.path(CADDY_CA).exists()
            else workdir / "missing-ca.pem"
        )
        site = Site("127.0.0.1", ports.https, "devops/pypi", "devops", USER_PASSWORD, ca)
        yield Converged(host, ports, first, second, site, watcher.seen, workdir)
    except BaseException:
        print(host.debug_report())
        raise
    finally:
        host.stop()


def test_first_apply_converges(converged: Converged) -> None:
    run = converged.first
    assert run.returncode == 0, run.stderr[-5000:]
    report = run.report
    assert report["failed"] == 0
    steps = {s["name"]: s["status"] for s in report["steps"]}  # type: ignore[union-attr]
    # Every step of the agent's own list ran (the list lives in agent/steps/__init__.py only).
    assert list(steps) == [step.name for step in STEPS]
    assert steps["apt"] == "changed" and steps["caddy"] == "changed"
    print(f"first apply: {run.seconds:.1f} s wall")


def test_first_apply_builds_the_venv_while_apt_installs(converged: Converged) -> None:
    """uv needs nothing apt installs: on a fresh host the venv step runs beside apt."""
    reported = {s["name"]: s for s in converged.first.report["steps"]}  # type: ignore[union-attr]
    apt, venv = reported["apt"], reported["venv"]
    assert venv.get("early") is True and "early" not in apt
    assert venv["status"] == "changed"
    overlap = min(apt["started"] + apt["seconds"], venv["started"] + venv["seconds"]) - max(
        apt["started"], venv["started"]
    )
    assert overlap > 0, reported
    print(f"apt {apt['seconds']:.1f} s and venv {venv['seconds']:.1f} s overlapped {overlap:.1f} s")
    # A second apply has a venv: nothing starts early.
    assert not any(s.get("early") for s in converged.second.report["steps"])  # type: ignore[union-attr]


def test_second_apply_changes_nothing(converged: Converged) -> None:
    run = converged.second
    assert run.returncode == 0, run.stderr[-5000:]
    assert run.report["changed"] == 0, run.report
    assert run.report["failed"] == 0
    steps = {s["name"]: s["seconds"] for s in run.report["steps"]}  # type: ignore[union-attr]
    print(f"no-op apply: {run.seconds:.2f} s wall; per step: {steps}")


def test_json_mode_keeps_stdout_to_one_document(converged: Converged) -> None:
    assert set(converged.second.report) == {"changed", "failed", "steps"}
    assert "recap" in converged.second.stderr


def test_basic_auth_is_enforced(converged: Converged) -> None:
    site = converged.site
    assert http_get(site, "/+api", auth=None)[0] == 401
    assert http_get(site, "/+api", auth=("devops", "wrong-password"))[0] == 401
    assert http_get(site, "/+api", auth=("devops", USER_PASSWORD))[0] == 200


def test_changelog_is_closed(converged: Converged) -> None:
    status, _ = http_get(converged.site, "/+changelog/0", auth=("devops", USER_PASSWORD))
    assert status == 403


def test_web_ui_and_api_use_https_urls(converged: Converged) -> None:
    site = converged.site
    status, body = http_get(
        site, "/+api", auth=("devops", USER_PASSWORD), accept="application/json"
    )
    assert status == 200
    assert f"https://127.0.0.1:{site.port}/+login" in body
    status, page = http_get(
        site, "/devops/pypi", auth=("devops", USER_PASSWORD), accept="text/html"
    )
    assert status == 200
    assert f"https://127.0.0.1:{site.port}/" in page
    assert f"http://127.0.0.1:{site.port}" not in page
    assert f"127.0.0.1:{converged.ports.devpi}" not in page


def test_devpi_listens_on_loopback_only(converged: Converged) -> None:
    listening = converged.host.output(["cat", "/proc/net/tcp", "/proc/net/tcp6"])
    port_hex = f"{converged.ports.devpi:04X}"
    local = [line.split()[1] for line in listening.splitlines()[1:] if line.split()[3:4] == ["0A"]]
    bound = [address for address in local if address.endswith(":" + port_hex)]
    assert bound == ["0100007F:" + port_hex], bound


def test_twine_upload_then_pip_and_uv_install(converged: Converged) -> None:
    site, work = converged.site, converged.workdir
    home = work / "home"
    home.mkdir()
    wheel = build_wheel(work, PACKAGE, "1.0.0")
    upload = twine_upload(site, wheel, home)
    assert upload.returncode == 0, upload.stdout + upload.stderr

    pip = pip_install(site, home, work / "pip-target", f"{PACKAGE}==1.0.0", "six")
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (work / "pip-target" / "devpi_agent_canary" / "__init__.py").exists()
    assert (work / "pip-target" / "six.py").exists()

    uv = uv_install(site, home, work / "uv-target", f"{PACKAGE}==1.0.0")
    assert uv.returncode == 0, uv.stdout + uv.stderr
    assert (work / "uv-target" / "devpi_agent_canary" / "__init__.py").exists()


PEP691 = "application/vnd.pypi.simple.v1+json"


def test_index_pages_are_compressed_and_packages_are_not(converged: Converged) -> None:
    """Caddy's encode: a client asking gets an index page gzip'd or zstd'd, a wheel as uploaded
    (already an archive). Pages under Caddy's 512 bytes pass as they are, so six's (the
    mirror's, through the index) is the page compressed here."""
    site, work = converged.site, converged.workdir
    auth = (site.user, site.password)
    page = f"/{site.index}/+simple/six/"
    status, headers, plain = http_fetch(site, page, auth=auth, headers={"Accept": PEP691})
    assert status == 200 and "content-encoding" not in headers, headers
    assert len(plain) > 4096, plain
    status, headers, body = http_fetch(
        site, page, auth=auth, headers={"Accept": PEP691, "Accept-Encoding": "gzip, deflate"}
    )
    assert status == 200 and headers.get("content-encoding") == "gzip", headers
    assert gzip.decompress(body) == plain and len(body) < len(plain) / 2
    status, headers, _ = http_fetch(
        site, page, auth=auth, headers={"Accept": PEP691, "Accept-Encoding": "gzip, deflate, zstd"}
    )
    assert status == 200 and headers.get("content-encoding") == "zstd", headers

    home = work / "encode-home"
    home.mkdir()
    wheel = build_wheel(work, "devpi-agent-encode-probe", "1.0.0")
    upload = twine_upload(site, wheel, home)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    page = f"/{site.index}/+simple/devpi-agent-encode-probe/"
    status, _, listing = http_fetch(site, page, auth=auth, headers={"Accept": PEP691})
    files = json.loads(listing)["files"]
    assert status == 200 and [f["filename"] for f in files] == [wheel.name], files
    url = urllib.parse.urljoin(site.base + page, files[0]["url"]).partition("#")[0]
    status, headers, served = http_fetch(
        site, url[len(site.base) :], auth=auth, headers={"Accept-Encoding": "gzip, zstd"}
    )
    assert status == 200 and "content-encoding" not in headers, headers
    assert served == wheel.read_bytes()


def test_search_finds_uploads_and_the_mirror_holds_no_pypi_list(converged: Converged) -> None:
    """Whoosh search by default, cheap because root/pypi never loads PyPI's ~930k names."""
    site, work = converged.site, converged.workdir
    home = work / "search-home"
    home.mkdir()
    name = "devpi-agent-search-probe"
    upload = twine_upload(site, build_wheel(work, name, "1.0.0"), home)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    auth = (site.user, site.password)
    deadline = time.monotonic() + 60  # devpi-web indexes in a background thread
    while True:
        status, page = http_get(site, "/+search?query=search-probe", auth=auth)
        if (status == 200 and name in page) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200 and name in page, page[-2000:]

    status, body = http_get(site, "/root/pypi", auth=auth, accept="application/json")
    assert status == 200, body[-500:]
    mirror = json.loads(body)["result"]
    assert mirror["type"] == "mirror"
    assert mirror["mirror_no_project_list"] is True
    assert len(mirror.get("projects", [])) < 1000, "root/pypi loaded PyPI's project list"


def test_wrong_password_upload_is_refused(converged: Converged) -> None:
    site, work = converged.site, converged.workdir
    home = work / "bad-home"
    home.mkdir()
    wrong = Site(site.host, site.port, site.index, site.user, "not-the-password", site.ca_bundle)
    upload = twine_upload(wrong, build_wheel(work, PACKAGE, "9.9.9"), home)
    assert upload.returncode != 0
    assert "401" in upload.stdout + upload.stderr


# Inside the host, straight to devpi: does a password log in; or (with a second line on stdin)
# set another one as that user, as `devpi user -m devops password=...` would.
_DEVPI_PASSWORD = """
import base64, json, sys, urllib.error, urllib.request
port, user = sys.argv[1], sys.argv[2]
lines = sys.stdin.read().splitlines()
def call(method, path, body, auth=None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    if auth:
        request.add_header("X-Devpi-Auth", auth)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None
status, payload = call("POST", "/+login", {"user": user, "password": lines[0]})
if len(lines) > 1 and status == 200:
    token = base64.b64encode(f"{user}:{payload['result']['password']}".encode()).decode()
    status, _ = call("PATCH", f"/{user}", {"password": lines[1]}, token)
print(status)
"""


def devpi_password(host: NspawnHost, port: int, password: str, new: str | None = None) -> int:
    stdin = password + "\n" + (new + "\n" if new else "")
    argv = ["python3", "-c", _DEVPI_PASSWORD, str(port), "devops"]
    return int(host.output(argv, input=stdin.encode()))


def test_a_password_changed_behind_the_agents_back_is_set_again(converged: Converged) -> None:
    """apply notices a password changed in devpi outside the agent, also after no-op runs that
    skipped the login check (the memo of devpi-users), and sets the configured one again."""
    host, port = converged.host, converged.ports.devpi
    for _ in range(2):
        noop = apply(host)
        assert noop.returncode == 0 and noop.report["changed"] == 0, noop.stderr[-3000:]
    assert host.path("/var/lib/devpi-agent/devpi-logins.memo").exists()
    assert devpi_password(host, port, USER_PASSWORD, "changed-Behind-its-back-1") == 200
    assert devpi_password(host, port, USER_PASSWORD) == 401
    fixed = apply(host)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    steps = {s["name"]: s["status"] for s in fixed.report["steps"]}  # type: ignore[union-attr]
    assert steps["devpi-users"] == "changed", fixed.report
    assert fixed.report["changed"] == 1, fixed.report
    assert devpi_password(host, port, USER_PASSWORD) == 200
    assert devpi_password(host, port, "changed-Behind-its-back-1") == 401
    again = apply(host)
    assert again.returncode == 0 and again.report["changed"] == 0, again.report


def test_unprivileged_user_cannot_reach_caddys_admin_api(converged: Converged) -> None:
    """Caddy's admin API takes any config without a password: whoever reaches it owns the site."""
    address = assert_locked_out(converged.host, free_port())
    assert address.startswith("unix/"), address


def test_secret_files_are_private(converged: Converged) -> None:
    host = converged.host
    for path, owner in (
        ("/etc/devpi-agent/root.pass", "root"),
        ("/var/lib/devpi/secret", "devpi"),
        (CONFIG, "root"),
    ):
        stat = host.output(["stat", "-c", "%a %U", path])
        assert stat == f"600 {owner}", (path, stat)
    assert host.output(["stat", "-c", "%a %U:%G", "/etc/caddy/Caddyfile"]) == "640 root:caddy"


def test_devpi_runs_unprivileged(converged: Converged) -> None:
    users = {user for user, program in processes(converged.host) if program == "devpi-server"}
    assert users == {"devpi"}


def test_no_password_anywhere(converged: Converged) -> None:
    host = converged.host
    root_password = host.path("/etc/devpi-agent/root.pass").read_text().strip()
    canaries = [USER_PASSWORD, root_password]
    texts = {
        "apply stdout/stderr": converged.first.stdout
        + converged.first.stderr
        + converged.second.stdout
        + converged.second.stderr,
        "agent log": host.path("/var/log/devpi-agent/agent.core.log").read_text(),
        "supervisor logs": "".join(
            p.read_text(errors="replace") for p in host.path("/var/log/supervisor").glob("*")
        ),
        "journal": host.journal(lines=5000),
        "argv": "\n".join(converged.argv_seen),
    }
    assert texts["agent log"].strip(), "the agent log is empty"
    for where, text in texts.items():
        for canary in canaries:
            assert canary not in text, f"a password leaked into {where}"


def test_invalid_config_exits_2_and_touches_nothing(converged: Converged) -> None:
    host = converged.host
    # devpi's search indexer writes .indices on its own, in the background, after an upload.
    listing = [
        "find", "/etc", "/var/lib/devpi",
        "-path", "/var/lib/devpi/server/.indices", "-prune", "-o",
        "-newer", CONFIG, "-printf", "%p %T@\n",
    ]  # fmt: skip
    before = host.output(listing)
    bad = config_text(converged.ports).replace("[devpi]", "[devpi]\nprot = 1")
    host.write("/tmp-bad.toml", bad, mode=0o600)
    run = apply(host, config="/tmp-bad.toml")
    assert run.returncode == 2
    assert "devpi.prot" in run.stderr
    assert run.stdout == ""
    after = host.output(listing)
    assert before == after


@pytest.fixture
def fresh_host(rootfs: Path) -> Iterator[NspawnHost]:
    host = NspawnHost(rootfs)
    try:
        host.prepare()
        host.copy_in(DIST, AGENT, mode=0o755)
        yield host
    finally:
        host.stop()


def test_invalid_config_on_a_fresh_host_installs_nothing(fresh_host: NspawnHost) -> None:
    ports = Ports.free()
    fresh_host.write(CONFIG, config_text(ports, password="x" * 73), mode=0o600)
    fresh_host.start(systemd=True)
    run = apply(fresh_host)
    assert run.returncode == 2, run.stderr
    assert "users[0].password" in run.stderr and "72 bytes" in run.stderr
    dpkg = fresh_host.run(["dpkg-query", "-W", "caddy", "supervisor"], check=False)
    assert dpkg.returncode != 0, "packages were installed despite an invalid config"
    for path in ("/etc/devpi-server", "/var/lib/devpi", "/var/log/devpi-agent", "/opt/devpi-agent"):
        assert not fresh_host.path(path).exists(), path


def test_without_systemd_the_agent_starts_supervisord_and_caddy(fresh_host: NspawnHost) -> None:
    ports = Ports.free()
    fresh_host.write(CONFIG, config_text(ports), mode=0o600)
    fresh_host.start(systemd=False)
    first = apply(fresh_host)
    assert first.returncode == 0, first.stderr[-5000:]
    second = apply(fresh_host)
    assert second.returncode == 0 and second.report["changed"] == 0, second.report
    site = Site(
        "127.0.0.1",
        ports.https,
        "devops/pypi",
        "devops",
        USER_PASSWORD,
        make_ca_bundle(fresh_host.path(CADDY_CA), fresh_host.dir / "ca-bundle.pem"),
    )
    assert http_get(site, "/+api", auth=None)[0] == 401
    assert http_get(site, "/+api", auth=("devops", USER_PASSWORD))[0] == 200
    home = fresh_host.dir / "client-home"
    home.mkdir()
    pip = pip_install(site, home, home / "target", "six")
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert_locked_out(fresh_host, free_port())
    running = set(processes(fresh_host))
    assert ("root", "supervisord") in running and ("caddy", "caddy") in running, running
