"""`make bench`: the performance figures of issue #6, measured on this machine.

Prints each figure and appends one JSON line per run to bench/results/results.jsonl (date, machine,
figures) and rewrites bench/results/latest.md. Ratios measured in one run are the figures that
count; absolute times are context. Needs root (boots systemd-nspawn hosts).

    python bench/run.py [--memory-minutes N] [--noop-runs N] [--rounds N]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO))

from agenthost import AGENT, CADDY_CA, CONFIG, DIST, Ports, apply, config_text  # noqa: E402
from clients import (  # noqa: E402
    SYSTEM_BUNDLE,
    Site,
    build_wheel,
    http_get,
    make_ca_bundle,
    twine_upload,
)
from nspawn import NspawnHost, build_rootfs, default_cache_dir  # noqa: E402

from agent.core.devpilock import parse_lock, shipped_lock  # noqa: E402
from agent.host.uv import INDEX_URL as UV_INDEX_URL  # noqa: E402
from agent.host.uv import pick_wheel as uv_pick_wheel  # noqa: E402
from agent.host.uv import shipped_pin as uv_shipped_pin  # noqa: E402

RESULTS = REPO / "bench" / "results"
PASSWORD = "bench-Pw-4b1d9e"
# About ten public packages with a few dependencies: a typical small project's install.
PUBLIC_SET = [
    "requests",
    "click",
    "attrs",
    "packaging",
    "python-dateutil",
    "pyyaml",
    "idna",
    "six",
    "tomli",
    "typing-extensions",
]
# The idiomatic Ansible playbook for the same job (issue #6), run in its own fresh nspawn container
# in the same bench run, in pairs with the agent's first applies (issue #15).
PEER_RUN = Path(os.environ.get("PEER_DIR", REPO.parent / "shared" / "peers" / "ansible")) / "run.sh"


def log(message: str) -> None:
    print(message, flush=True)


def timed(fn: Any) -> tuple[float, Any]:
    started = time.monotonic()
    value = fn()
    return time.monotonic() - started, value


def first_apply(rootfs: Path) -> tuple[float, dict[str, float], NspawnHost, Ports]:
    """apply on a fresh host: wall seconds, seconds per step, and the host (still running)."""
    ports = Ports.free()
    host = NspawnHost(rootfs)
    host.prepare()
    host.copy_in(DIST, AGENT, mode=0o755)
    host.write(CONFIG, config_text(ports, password=PASSWORD), mode=0o600)
    host.start(systemd=True)
    first = apply(host)
    if first.returncode != 0:
        raise SystemExit(f"first apply failed:\n{first.stderr[-3000:]}")
    reported = first.report["steps"]  # type: ignore[index]
    steps = {s["name"]: s["seconds"] for s in reported}
    # The venv may build beside apt (an early step): the wall time the two cover together.
    spans = sorted(
        (s["started"], s["started"] + s["seconds"])
        for s in reported
        if s["name"] in ("apt", "venv")
    )
    covered, reach = 0.0, 0.0
    for begin, end in spans:
        covered += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    steps["apt+venv"] = round(covered, 3)
    log(f"first apply: {first.seconds:.1f} s wall; steps {steps}")
    return first.seconds, steps, host, ports


def peer_run() -> dict[str, float]:
    """One Ansible peer run: a fresh container, ansible-core installed (timed apart), the first
    playbook run, one no-op run; its own summary line must say all went well."""
    result = subprocess.run(
        [str(PEER_RUN)],
        env={**os.environ, "FIRST_RUNS": "1", "NOOP_RUNS": "1"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    summary = re.search(r"ansible-peer: first ([0-9.]+) s; noop median ([0-9.]+) s", result.stdout)
    install = re.search(r"ansible-core install \(.*\): ([0-9.]+) s", result.stdout)
    clean = "first-run-failed=0 noop-not-clean=0 verify-failed=0" in result.stdout
    if result.returncode != 0 or summary is None or install is None or not clean:
        raise SystemExit(f"ansible peer failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    figures = {
        "first_s": float(summary.group(1)),
        "noop_s": float(summary.group(2)),
        "install_s": float(install.group(1)),
    }
    log(
        f"ansible peer: first {figures['first_s']} s (+ {figures['install_s']} s installing "
        f"ansible-core), no-op {figures['noop_s']} s"
    )
    return figures


def first_vs_floor(rootfs: Path, rounds: int) -> tuple[dict[str, Any], NspawnHost, Ports]:
    """First applies and floors in pairs: downloads from PyPI and the apt mirror vary by several
    seconds from one minute to the next, so each ratio compares a pair measured side by side,
    and the figures are medians over the rounds. The last first apply's host stays up."""
    pairs: list[tuple[float, dict[str, Any]]] = []
    peers: list[dict[str, float]] = []
    step_runs: dict[str, list[float]] = {}
    host: NspawnHost | None = None
    ports: Ports | None = None
    for number in range(rounds):
        if host is not None:
            host.stop()
        # Turns alternate which goes first: a package fetched once may come faster the next
        # time from a proxy or mirror between this machine and PyPI.
        # The peer goes on the other side: even rounds peer, apply, floor; odd rounds floor,
        # apply, peer.
        measured_floor = floors_of(rootfs) if number % 2 else None
        measured_peer = None if number % 2 else peer_run()
        seconds, steps, host, ports = first_apply(rootfs)
        for name, value in steps.items():
            step_runs.setdefault(name, []).append(value)
        pairs.append((seconds, measured_floor or floors_of(rootfs)))
        peers.append(measured_peer or peer_run())
        log(
            f"round {number + 1}: first apply / floor = {seconds / pairs[-1][1]['floor_s']:.2f},"
            f" / peer = {seconds / peers[-1]['first_s']:.2f}"
        )
    assert host is not None and ports is not None
    firsts = [seconds for seconds, _ in pairs]
    floors = [f["floor_s"] for _, f in pairs]
    # What each first apply spent beyond its own apt and venv steps (the floor's work), the
    # two counted once where they ran side by side.
    beyond = [first - both for first, both in zip(firsts, step_runs["apt+venv"], strict=True)]
    return (
        {
            "rounds": rounds,
            "first_apply_s": round(statistics.median(firsts), 2),
            "first_apply_runs_s": [round(x, 2) for x in firsts],
            "first_apply_steps_s": {
                k: round(statistics.median(v), 3) for k, v in step_runs.items()
            },
            "floor_apt_s": round(statistics.median(f["floor_apt_s"] for _, f in pairs), 2),
            "floor_pip_s": round(statistics.median(f["floor_pip_s"] for _, f in pairs), 2),
            "floor_s": round(statistics.median(floors), 2),
            "floor_runs_s": floors,
            # The floor with apt and uv at once, as the agent's first apply runs them.
            "floor_side_by_side_s": round(
                statistics.median(f["floor_side_by_side_s"] for _, f in pairs), 2
            ),
            "first_vs_floor_side_by_side_runs": [
                round(a / f["floor_side_by_side_s"], 2)
                for a, (_, f) in zip(firsts, pairs, strict=True)
            ],
            "first_vs_floor_runs": [round(a / b, 2) for a, b in zip(firsts, floors, strict=True)],
            "beyond_floor_s": round(statistics.median(beyond), 2),
            "beyond_floor_runs_s": [round(x, 2) for x in beyond],
            # Each pair's ratio had the apply's apt and venv steps taken as long as its floor's
            # apt and pip: the agent's own cost, without the minute-to-minute download noise.
            "first_vs_floor_same_downloads": round(
                statistics.median((f + b) / f for f, b in zip(floors, beyond, strict=True)), 2
            ),
            "peer_first_s": round(statistics.median(p["first_s"] for p in peers), 2),
            "peer_first_runs_s": [p["first_s"] for p in peers],
            "peer_install_s": round(statistics.median(p["install_s"] for p in peers), 2),
            "peer_noop_s": round(statistics.median(p["noop_s"] for p in peers), 2),
            "first_vs_peer_runs": [
                round(a / p["first_s"], 2) for a, p in zip(firsts, peers, strict=True)
            ],
        },
        host,
        ports,
    )


def noop(host: NspawnHost, runs: int) -> dict[str, Any]:
    noops = []
    noop_steps: dict[str, list[float]] = {}
    for _ in range(runs):
        run = apply(host)
        assert run.report["changed"] == 0, run.report
        noops.append(run.seconds)
        for step in run.report["steps"]:  # type: ignore[union-attr]
            noop_steps.setdefault(step["name"], []).append(step["seconds"])
    median = statistics.median(noops)
    log(f"no-op apply: median {median:.2f} s over {runs} runs ({min(noops):.2f}-{max(noops):.2f})")
    return {
        "noop_apply_median_s": round(median, 3),
        "noop_apply_runs_s": [round(x, 3) for x in noops],
        "noop_steps_median_s": {k: round(statistics.median(v), 3) for k, v in noop_steps.items()},
    }


# The floor's uv: the same locked wheel the agent fetches, downloaded and checked inside the host.
_FETCH_UV = """
import hashlib, sys, urllib.request, zipfile, io, os
url, digest, member = sys.argv[1:4]
data = urllib.request.urlopen(url, timeout=120).read()
assert hashlib.sha256(data).hexdigest() == digest, "uv wheel hash"
os.makedirs("/root/floor-uv", exist_ok=True)
with open("/root/floor-uv/uv", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(data)).read(member))
os.chmod("/root/floor-uv/uv", 0o755)
"""


def _uv_wheel() -> tuple[str, str, str]:
    """(URL, sha256, binary's member) of the locked uv wheel for this machine (bench/run.py runs
    on the hosts' architecture)."""
    pin = uv_shipped_pin()
    request = urllib.request.Request(
        UV_INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        page = json.load(response)
    _, url, digest = uv_pick_wheel(page, pin, platform.machine())
    return url, digest, f"uv-{pin.version}.data/scripts/uv"


def floors_of(rootfs: Path) -> dict[str, Any]:
    """Both floors, one after the other: apt then uv, and apt and uv at once."""
    return {**floor(rootfs), **floor(rootfs, side_by_side=True)}


def floor(rootfs: Path, *, side_by_side: bool = False) -> dict[str, Any]:
    """Fetching and installing the same apt and PyPI packages directly, nothing else: apt, then
    uv (fetched as the agent fetches it) making the venv and installing the lock as the agent's
    venv step does. side_by_side: the two at once, as the agent's first apply runs them."""
    url, digest, member = _uv_wheel()
    with NspawnHost(rootfs) as host:
        host.start(systemd=True)
        # The same locked packages the agent installs, hashes checked, nothing resolved: the
        # wheels in one uv run, then the sdist-only ones built against the locked setuptools.
        pins = parse_lock(shipped_lock())
        host.write(
            "/root/floor-wheels.txt", "".join(p.text + "\n" for p in pins if not p.sdist_only)
        )
        host.write("/root/floor-sdists.txt", "".join(p.text + "\n" for p in pins if p.sdist_only))
        host.write("/root/floor-fetch-uv.py", _FETCH_UV)
        apt = (
            "DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y -qq --no-install-recommends supervisor caddy openssl"
        )
        install = (
            "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_CACHE_DIR=/root/floor-cache "
            "UV_PYTHON_DOWNLOADS=never /root/floor-uv/uv pip install -q "
            "--python /root/floor/bin/python "
            "--require-hashes --no-deps --compile-bytecode --link-mode copy"
        )
        venv = (
            f"python3 /root/floor-fetch-uv.py {url} {digest} {member}"
            " && /root/floor-uv/uv venv -q --python /usr/bin/python3 /root/floor"
            f" && {install} --only-binary :all: -r /root/floor-wheels.txt"
            f" && {install} --no-build-isolation -r /root/floor-sdists.txt"
        )
        if side_by_side:
            both = f"({apt}) & a=$!; ({venv}) & v=$!; wait $a && wait $v"
            both_s, _ = timed(lambda: host.run(["sh", "-c", both], timeout=1200))
            log(f"floor side by side: apt and uv at once {both_s:.1f} s")
            return {"floor_side_by_side_s": round(both_s, 2)}
        apt_s, _ = timed(lambda: host.run(["sh", "-c", apt], timeout=1200))
        pip_s, _ = timed(lambda: host.run(["sh", "-c", venv], timeout=1200))
    log(f"floor: apt {apt_s:.1f} s + uv venv {pip_s:.1f} s = {apt_s + pip_s:.1f} s")
    return {
        "floor_apt_s": round(apt_s, 2),
        "floor_pip_s": round(pip_s, 2),
        "floor_s": round(apt_s + pip_s, 2),
    }


def agent_start() -> dict[str, Any]:
    cold = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as pex_root:
            env = {"PATH": "/usr/bin:/bin", "PEX_ROOT": pex_root}
            seconds, _ = timed(
                lambda env=env: subprocess.run(
                    [str(DIST), "version"], env=env, check=True, capture_output=True
                )
            )
            cold.append(seconds)
    warm = []
    for _ in range(10):
        seconds, _ = timed(
            lambda: subprocess.run(
                [str(DIST), "version"],
                env={"PATH": "/usr/bin:/bin"},
                check=True,
                capture_output=True,
            )
        )
        warm.append(seconds)
    log(
        f"agent start: cold median {statistics.median(cold):.2f} s, "
        f"warm median {statistics.median(warm):.3f} s"
    )
    return {
        "start_cold_median_s": round(statistics.median(cold), 3),
        "start_warm_median_s": round(statistics.median(warm), 3),
    }


def _client_env(bundle: Path, home: Path) -> dict[str, str]:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    for name in ("REQUESTS_CA_BUNDLE", "PIP_CERT", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        env[name] = str(bundle)
    return env


def installs(site: Site) -> dict[str, Any]:
    bin_dir = Path(sys.executable).parent
    results: dict[str, Any] = {}
    # Client caches are always empty. "server_cold" is devpi's first fetch of each page and file
    # from PyPI (its cache empty): only the first install through it can be that, so it is uv's,
    # the tool with a target. "server_warm" installs are served from devpi's cache.
    runs = (
        ("direct", "https://pypi.org/simple/", "pip"),
        ("direct", "https://pypi.org/simple/", "uv"),
        ("server_cold", site.simple_url(), "uv"),
        ("server_warm", site.simple_url(), "uv"),
        ("server_warm", site.simple_url(), "pip"),
    )
    for label, index, tool in runs:
        with tempfile.TemporaryDirectory() as work:
            home, target = Path(work) / "home", Path(work) / "target"
            home.mkdir()
            env = _client_env(site.ca_bundle if label != "direct" else SYSTEM_BUNDLE, home)
            if tool == "pip":
                argv = [
                    str(bin_dir / "python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-cache-dir",
                    "--isolated",
                    "--index-url",
                    index,
                    "--target",
                    str(target),
                    *PUBLIC_SET,
                ]
            else:
                env["UV_DEFAULT_INDEX"] = index
                argv = [
                    str(bin_dir / "uv"),
                    "pip",
                    "install",
                    "-q",
                    "--no-cache",
                    "--target",
                    str(target),
                    *PUBLIC_SET,
                ]
            seconds, result = timed(
                lambda argv=argv, env=env: subprocess.run(
                    argv, env=env, capture_output=True, text=True, timeout=900
                )
            )
            if result.returncode != 0:
                raise SystemExit(f"{tool} via {label} failed: {result.stderr[-2000:]}")
            results[f"{tool}_{label}_s"] = round(seconds, 2)
            log(f"{tool} install of {len(PUBLIC_SET)} packages via {label}: {seconds:.1f} s")
    for tool, label in (("uv", "server_cold"), ("uv", "server_warm"), ("pip", "server_warm")):
        results[f"{tool}_ratio_{label}_vs_direct"] = round(
            results[f"{tool}_{label}_s"] / results[f"{tool}_direct_s"], 2
        )
    return results


class KeepAlive:
    """One persistent HTTP(S) connection, as pip and uv use: the figure is the server's time,
    not a TLS handshake per request."""

    def __init__(self, connection: http.client.HTTPConnection, auth: str | None) -> None:
        self.connection = connection
        self.headers = {"Authorization": auth} if auth else {}

    def get(self, path: str) -> bytes:
        self.connection.request("GET", path, headers=self.headers)
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"GET {path} answered {response.status}")
        return body


def latency(site: Site, devpi_port: int) -> dict[str, Any]:
    token = base64.b64encode(f"{site.user}:{site.password}".encode()).decode()
    context = ssl.create_default_context(cafile=str(site.ca_bundle))
    direct = KeepAlive(http.client.HTTPConnection("127.0.0.1", devpi_port, timeout=60), None)
    proxied = KeepAlive(
        http.client.HTTPSConnection(site.host, site.port, context=context, timeout=60),
        f"Basic {token}",
    )
    page = f"/{site.index}/+simple/six/"
    html = proxied.get(page).decode()  # also fills the mirror's cache for six
    href = re.search(r'href="([^"]+\.whl)[#"]', html)
    if href is None:
        raise SystemExit(f"no wheel link on {page}")
    wheel = urllib.parse.urljoin(page, href.group(1))
    wheel = urllib.parse.urlsplit(wheel).path
    proxied.get(wheel)  # devpi downloads it from PyPI once; then both serve its copy
    figures: dict[str, Any] = {}
    for name, path in (("simple_page", page), ("file", wheel)):
        samples: dict[str, list[float]] = {"direct": [], "caddy": []}
        for _ in range(5):  # warm both connections
            direct.get(path), proxied.get(path)
        for _ in range(200):  # interleaved, so drift in machine load hits both alike
            for label, client in (("direct", direct), ("caddy", proxied)):
                seconds, _ = timed(lambda client=client, path=path: client.get(path))
                samples[label].append(seconds * 1000)
        for label, values in samples.items():
            figures[f"{name}_{label}_median_ms"] = round(statistics.median(values), 2)
        figures[f"{name}_overhead_pct"] = round(
            100 * (figures[f"{name}_caddy_median_ms"] / figures[f"{name}_direct_median_ms"] - 1), 1
        )
        log(
            f"{name}: direct {figures[f'{name}_direct_median_ms']} ms, through Caddy "
            f"{figures[f'{name}_caddy_median_ms']} ms ({figures[f'{name}_overhead_pct']} %)"
        )
    return figures


# Mirror traffic for the memory window: popular projects, each fetched through devpi once, then
# again from its cache, so devpi's memory holds what a busy team would have asked for.
TRAFFIC_PROJECTS = [
    "flask", "django", "numpy", "pandas", "boto3", "botocore", "pytest", "rich", "httpx",
    "pydantic", "jinja2", "sqlalchemy", "fastapi", "uvicorn", "celery", "redis", "psycopg2-binary",
    "cryptography", "cffi", "pycparser", "setuptools", "wheel", "pip", "virtualenv", "tox",
    "black", "ruff", "mypy", "isort", "flake8", "coverage", "hypothesis", "scipy", "matplotlib",
    "pillow", "lxml", "beautifulsoup4", "markupsafe", "werkzeug", "itsdangerous", "gunicorn",
    "protobuf", "grpcio", "googleapis-common-protos", "google-auth", "oauthlib", "pyjwt", "rsa",
    "pyasn1", "certifi", "charset-normalizer", "urllib3", "idna", "requests", "aiohttp",
    "multidict", "yarl", "frozenlist", "attrs", "packaging", "pyparsing", "platformdirs",
    "filelock", "tomli", "tomlkit", "pyyaml", "docutils", "sphinx", "babel", "pytz", "tzdata",
    "python-dateutil", "six", "typing-extensions", "wrapt", "decorator", "click", "colorama",
    "tqdm", "psutil", "paramiko", "bcrypt", "pynacl", "fsspec", "s3transfer", "jmespath",
    "awscli", "openpyxl", "xlrd", "networkx", "sympy", "mpmath", "joblib", "scikit-learn",
    "threadpoolctl", "regex", "tenacity", "structlog", "sh", "pexpect",
]  # fmt: skip


def devpi_rss(host: NspawnHost, minutes: float, site: Site) -> dict[str, Any]:
    def memory_kb() -> tuple[int, int]:
        """devpi-server's VmRSS and VmHWM (the kernel's high-water mark, which also catches
        spikes between samples, such as the argon2 key derivation at start)."""
        # Minimal images have no procps: read /proc inside the host.
        script = (
            "import os\n"
            "rss = hwm = 0\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            "        if b'devpi-server' in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
            "            for line in open(f'/proc/{pid}/status'):\n"
            "                if line.startswith('VmRSS:'):\n"
            "                    rss += int(line.split()[1])\n"
            "                if line.startswith('VmHWM:'):\n"
            "                    hwm += int(line.split()[1])\n"
            "    except OSError:\n"
            "        pass\n"
            "print(rss, hwm)\n"
        )
        rss, hwm = host.output(["python3", "-c", script]).split()
        return int(rss), int(hwm)

    idle_kb, _ = memory_kb()
    peak_kb = idle_kb
    stop = threading.Event()
    errors: list[str] = []
    site_auth = (site.user, site.password)

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            name = TRAFFIC_PROJECTS[i % len(TRAFFIC_PROJECTS)]
            status, _ = http_get(site, f"/{site.index}/+simple/{name}/", auth=site_auth)
            if status != 200:
                errors.append(f"{name}: {status}")
            i += 1
            stop.wait(1)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    deadline = time.monotonic() + minutes * 60
    while time.monotonic() < deadline:
        peak_kb = max(peak_kb, memory_kb()[0])
        time.sleep(5)
    stop.set()
    worker.join()
    rss_kb, hwm_kb = memory_kb()
    figures = {
        "devpi_rss_idle_mb": round(idle_kb / 1024),
        "devpi_rss_peak_sampled_mb": round(peak_kb / 1024),
        "devpi_rss_end_mb": round(rss_kb / 1024),
        "devpi_rss_peak_mb": round(max(peak_kb, hwm_kb) / 1024),
        "rss_window_min": minutes,
        "traffic_errors": len(errors),
        "search_finds_private_package": private_search_works(site),
    }
    log(
        f"devpi-server RSS: idle {figures['devpi_rss_idle_mb']} MB, peak "
        f"{figures['devpi_rss_peak_mb']} MB (VmHWM; sampled {figures['devpi_rss_peak_sampled_mb']}"
        f" MB), at the end {figures['devpi_rss_end_mb']} MB, over {minutes} min of mirror "
        f"traffic ({len(errors)} errors); private search works: "
        f"{figures['search_finds_private_package']}"
    )
    return figures


def private_search_works(site: Site) -> bool:
    """Upload a private package with twine, then look for it with devpi-web's search."""
    name = "benchmark-private-search-probe"
    with tempfile.TemporaryDirectory() as work:
        home = Path(work) / "home"
        home.mkdir()
        upload = twine_upload(site, build_wheel(Path(work), name, "1.0.0"), home)
        if upload.returncode != 0:
            raise SystemExit(f"twine upload failed: {upload.stderr[-2000:]}")
    # devpi-web indexes in a background thread: poll, bounded.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, html = http_get(
            site, "/+search?query=private-search-probe", auth=(site.user, site.password)
        )
        if status == 200 and name in html:
            return True
        time.sleep(1)
    return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-minutes", type=float, default=30.0)
    parser.add_argument("--noop-runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="first apply / floor pairs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root: it boots systemd-nspawn hosts")
    load_at_start = os.getloadavg()[0]  # anything else running skews the ratios
    started = time.monotonic()
    rootfs = build_rootfs(default_cache_dir())
    figures: dict[str, Any] = {}
    figures.update(agent_start())
    run_figures, host, ports = first_vs_floor(rootfs, args.rounds)
    figures.update(run_figures)
    figures.update(noop(host, args.noop_runs))
    try:
        with tempfile.TemporaryDirectory() as work:
            bundle = make_ca_bundle(host.path(CADDY_CA), Path(work) / "bundle.pem")
            site = Site("127.0.0.1", ports.https, "devops/pypi", "devops", PASSWORD, bundle)
            figures.update(latency(site, ports.devpi))
            figures.update(installs(site))
            figures.update(devpi_rss(host, args.memory_minutes, site))
    finally:
        host.stop()
    # The median of the side-by-side pairs' ratios (see first_vs_floor).
    figures["first_vs_floor"] = round(statistics.median(figures["first_vs_floor_runs"]), 2)
    figures["first_vs_floor_side_by_side"] = round(
        statistics.median(figures["first_vs_floor_side_by_side_runs"]), 2
    )
    figures["noop_vs_first"] = round(figures["noop_apply_median_s"] / figures["first_apply_s"], 4)
    figures["first_vs_peer"] = round(statistics.median(figures["first_vs_peer_runs"]), 2)
    figures["peer_noop_vs_noop"] = round(figures["peer_noop_s"] / figures["noop_apply_median_s"], 1)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "load_avg_at_start": load_at_start,
        "load_avg_at_end": os.getloadavg()[0],
        "wall_s": round(time.monotonic() - started, 1),
        **figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "results.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    (RESULTS / "latest.md").write_text(render_markdown(record))
    log(json.dumps(record, indent=2))
    return 0


def render_markdown(r: dict[str, Any]) -> str:
    rows = [
        (
            "first apply (fresh host)",
            f"{r['first_apply_s']} s",
            f"target <= 12 s; Ansible peer {r['peer_first_s']} s: {r['first_vs_peer']}x (target "
            f"<= 0.5x; pairs: {', '.join(str(x) for x in r['first_vs_peer_runs'])}); floor "
            f"{r['floor_s']} s: {r['first_vs_floor']}x (target <= 1.2x; median of {r['rounds']} "
            f"side-by-side pairs: {', '.join(str(x) for x in r['first_vs_floor_runs'])})",
        ),
        (
            "floor with apt and uv at once",
            f"{r['floor_side_by_side_s']} s",
            f"first apply {r['first_vs_floor_side_by_side']}x it (pairs: "
            f"{', '.join(str(x) for x in r['first_vs_floor_side_by_side_runs'])})",
        ),
        (
            "first apply beyond its apt and venv steps",
            f"{r['beyond_floor_s']} s",
            f"with the floor's download times: {r['first_vs_floor_same_downloads']}x the floor "
            f"(pairs: {', '.join(str(x) for x in r['beyond_floor_runs_s'])} s)",
        ),
        (
            "no-op apply",
            f"{r['noop_apply_median_s']} s",
            f"target <= 0.30 s; {r['noop_vs_first']} of first; "
            f"peer {r['peer_noop_s']} s is {r['peer_noop_vs_noop']}x slower",
        ),
        (
            "agent start, warm / cold",
            f"{r['start_warm_median_s']} s / {r['start_cold_median_s']} s",
            "target warm <= 0.10 s",
        ),
        (
            "+simple page via Caddy vs direct (keep-alive)",
            f"{r['simple_page_caddy_median_ms']} / {r['simple_page_direct_median_ms']} ms",
            f"overhead {r['simple_page_overhead_pct']} % (target <= 10 %)",
        ),
        (
            "wheel download via Caddy vs direct (keep-alive)",
            f"{r['file_caddy_median_ms']} / {r['file_direct_median_ms']} ms",
            f"overhead {r['file_overhead_pct']} %",
        ),
        (
            "uv install, 10 packages: server cold / warm / PyPI",
            f"{r['uv_server_cold_s']} / {r['uv_server_warm_s']} / {r['uv_direct_s']} s",
            f"{r['uv_ratio_server_cold_vs_direct']}x / {r['uv_ratio_server_warm_vs_direct']}x "
            "(target <= 3x)",
        ),
        (
            "pip install, 10 packages: server warm / PyPI",
            f"{r['pip_server_warm_s']} / {r['pip_direct_s']} s",
            f"{r['pip_ratio_server_warm_vs_direct']}x",
        ),
        (
            "devpi-server RSS idle / peak (VmHWM) / end",
            f"{r['devpi_rss_idle_mb']} / {r['devpi_rss_peak_mb']} / {r['devpi_rss_end_mb']} MB",
            f"over {r['rss_window_min']} min of mirror traffic (target peak <= 600 MB); "
            f"private search works: {r['search_finds_private_package']}",
        ),
    ]
    lines = [
        f"# Benchmarks: {r['date']} on {r['machine']} (load {r['load_avg_at_start']:.2f} at start,"
        f" {r['load_avg_at_end']:.2f} at end; {r['wall_s']} s wall)",
        "",
        "| figure | value | against |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
        "",
        "First apply per step (median s): "
        + ", ".join(f"{k} {v}" for k, v in r["first_apply_steps_s"].items()),
        "",
        "No-op apply per step (median s): "
        + ", ".join(f"{k} {v}" for k, v in r["noop_steps_median_s"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    shutil.which("systemd-nspawn") or sys.exit(
        "systemd-nspawn is missing: apt-get install systemd-container"
    )
    sys.exit(main())
