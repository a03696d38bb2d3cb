"""`make bench`: the performance figures of issue #6, measured on this machine.

Prints each figure and appends one JSON line per run to bench/results/results.jsonl (date, machine,
figures) and rewrites bench/results/latest.md. Ratios measured in one run are the figures that
count; absolute times are context. Needs root (boots systemd-nspawn hosts).

    python bench/run.py [--memory-minutes N] [--noop-runs N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from agenthost import AGENT, CADDY_CA, CONFIG, DIST, Ports, apply, config_text  # noqa: E402
from clients import SYSTEM_BUNDLE, Site, http_get, make_ca_bundle  # noqa: E402
from nspawn import NspawnHost, build_rootfs, default_cache_dir  # noqa: E402

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
DEVPI_PINS = ["devpi-server==6.20.3", "devpi-web==5.1.1", "devpi-client==7.3.0"]
# The idiomatic Ansible playbook measured in the same kind of container (issue #6).
PEER = {"first_run_median_s": 32.0, "noop_median_s": 7.3}


def log(message: str) -> None:
    print(message, flush=True)


def timed(fn: Any) -> tuple[float, Any]:
    started = time.monotonic()
    value = fn()
    return time.monotonic() - started, value


def first_and_noop(rootfs: Path, noop_runs: int) -> tuple[dict[str, Any], NspawnHost, Ports]:
    ports = Ports.free()
    host = NspawnHost(rootfs)
    host.prepare()
    host.copy_in(DIST, AGENT, mode=0o755)
    host.write(CONFIG, config_text(ports, password=PASSWORD), mode=0o600)
    host.start(systemd=True)
    first = apply(host)
    if first.returncode != 0:
        raise SystemExit(f"first apply failed:\n{first.stderr[-3000:]}")
    steps = {s["name"]: s["seconds"] for s in first.report["steps"]}  # type: ignore[union-attr]
    log(f"first apply: {first.seconds:.1f} s wall; steps {steps}")
    noops = []
    noop_steps: dict[str, list[float]] = {}
    for _ in range(noop_runs):
        run = apply(host)
        assert run.report["changed"] == 0, run.report
        noops.append(run.seconds)
        for step in run.report["steps"]:  # type: ignore[union-attr]
            noop_steps.setdefault(step["name"], []).append(step["seconds"])
    noop = statistics.median(noops)
    log(
        f"no-op apply: median {noop:.2f} s over {noop_runs} runs "
        f"({min(noops):.2f}-{max(noops):.2f})"
    )
    return (
        {
            "first_apply_s": round(first.seconds, 2),
            "first_apply_steps_s": steps,
            "noop_apply_median_s": round(noop, 3),
            "noop_apply_runs_s": [round(x, 3) for x in noops],
            "noop_steps_median_s": {
                k: round(statistics.median(v), 3) for k, v in noop_steps.items()
            },
        },
        host,
        ports,
    )


def floor(rootfs: Path) -> dict[str, Any]:
    """Fetching and installing the same apt and PyPI packages directly, nothing else."""
    with NspawnHost(rootfs) as host:
        host.start(systemd=True)
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        apt_s, _ = timed(
            lambda: host.run(
                [
                    "sh",
                    "-c",
                    "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
                    "python3-venv supervisor caddy",
                ],
                env=env,
                timeout=1200,
            )
        )
        pip_s, _ = timed(
            lambda: host.run(
                [
                    "sh",
                    "-c",
                    "python3 -m venv /tmp/floor && PIP_CERT=/etc/ssl/certs/ca-certificates.crt "
                    "/tmp/floor/bin/pip install -q " + " ".join(DEVPI_PINS),
                ],
                timeout=1200,
            )
        )
    log(f"floor: apt {apt_s:.1f} s + venv/pip {pip_s:.1f} s = {apt_s + pip_s:.1f} s")
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
    for label, index in (("direct", "https://pypi.org/simple/"), ("server", site.simple_url())):
        for tool in ("pip", "uv"):
            with tempfile.TemporaryDirectory() as work:
                home, target = Path(work) / "home", Path(work) / "target"
                home.mkdir()
                env = _client_env(site.ca_bundle if label == "server" else SYSTEM_BUNDLE, home)
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
    results["pip_ratio_server_vs_direct"] = round(
        results["pip_server_s"] / results["pip_direct_s"], 2
    )
    results["uv_ratio_server_vs_direct"] = round(results["uv_server_s"] / results["uv_direct_s"], 2)
    return results


def latency(site: Site, devpi_port: int) -> dict[str, Any]:
    import urllib.request

    def direct(path: str) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{devpi_port}{path}", timeout=60) as response:
            response.read()

    def proxied(path: str) -> None:
        status, _ = http_get(site, path, auth=(site.user, site.password))
        assert status == 200, status

    path = f"/{site.index}/+simple/six/"
    proxied(path)  # warm the mirror cache for this project
    figures: dict[str, Any] = {}
    for label, fn in (("direct", direct), ("caddy", proxied)):
        samples = []
        for _ in range(30):
            seconds, _ = timed(lambda fn=fn: fn(path))
            samples.append(seconds * 1000)
        figures[f"simple_page_{label}_median_ms"] = round(statistics.median(samples), 2)
    figures["simple_page_overhead_pct"] = round(
        100
        * (figures["simple_page_caddy_median_ms"] / figures["simple_page_direct_median_ms"] - 1),
        1,
    )
    log(
        f"+simple page: direct {figures['simple_page_direct_median_ms']} ms, through Caddy "
        f"{figures['simple_page_caddy_median_ms']} ms ({figures['simple_page_overhead_pct']} %)"
    )
    return figures


def devpi_rss(host: NspawnHost, minutes: float, site: Site) -> dict[str, Any]:
    def rss_mb() -> float:
        # Minimal images have no procps: read /proc inside the host.
        script = (
            "import os\n"
            "total = 0\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            "        if b'devpi-server' in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
            "            for line in open(f'/proc/{pid}/status'):\n"
            "                if line.startswith('VmRSS:'):\n"
            "                    total += int(line.split()[1])\n"
            "    except OSError:\n"
            "        pass\n"
            "print(total)\n"
        )
        return int(host.output(["python3", "-c", script])) / 1024

    idle = rss_mb()
    peak = idle
    stop = threading.Event()

    def traffic() -> None:
        names = [
            "flask",
            "django",
            "numpy",
            "pandas",
            "boto3",
            "pytest",
            "rich",
            "httpx",
            "pydantic",
            "jinja2",
        ]
        i = 0
        while not stop.is_set():
            http_get(
                site,
                f"/{site.index}/+simple/{names[i % len(names)]}/",
                auth=(site.user, site.password),
            )
            i += 1
            stop.wait(2)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    deadline = time.monotonic() + minutes * 60
    while time.monotonic() < deadline:
        peak = max(peak, rss_mb())
        time.sleep(5)
    stop.set()
    worker.join()
    log(
        f"devpi-server RSS: idle {idle:.0f} MB, peak {peak:.0f} MB "
        f"over {minutes} min of mirror traffic"
    )
    return {
        "devpi_rss_idle_mb": round(idle),
        "devpi_rss_peak_mb": round(peak),
        "rss_window_min": minutes,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-minutes", type=float, default=3.0)
    parser.add_argument("--noop-runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root: it boots systemd-nspawn hosts")
    rootfs = build_rootfs(default_cache_dir())
    figures: dict[str, Any] = {}
    figures.update(agent_start())
    figures.update(floor(rootfs))
    run_figures, host, ports = first_and_noop(rootfs, args.noop_runs)
    figures.update(run_figures)
    try:
        with tempfile.TemporaryDirectory() as work:
            bundle = make_ca_bundle(host.path(CADDY_CA), Path(work) / "bundle.pem")
            site = Site("127.0.0.1", ports.https, "devops/pypi", "devops", PASSWORD, bundle)
            figures.update(latency(site, ports.devpi))
            figures.update(installs(site))
            figures.update(devpi_rss(host, args.memory_minutes, site))
    finally:
        host.stop()
    figures["first_vs_floor"] = round(figures["first_apply_s"] / figures["floor_s"], 2)
    figures["noop_vs_first"] = round(figures["noop_apply_median_s"] / figures["first_apply_s"], 4)
    figures["first_vs_peer"] = round(figures["first_apply_s"] / PEER["first_run_median_s"], 2)
    figures["peer_noop_vs_noop"] = round(PEER["noop_median_s"] / figures["noop_apply_median_s"], 1)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "load_avg_at_start": os.getloadavg()[0],
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
            f"peer 32.0 s: {r['first_vs_peer']}x; floor {r['floor_s']} s: "
            f"{r['first_vs_floor']}x (target <= 1.5x)",
        ),
        (
            "no-op apply",
            f"{r['noop_apply_median_s']} s",
            f"target <= 1.0 s and <= 1/20 of first ({r['noop_vs_first']}); "
            f"peer 7.3 s is {r['peer_noop_vs_noop']}x slower",
        ),
        (
            "agent start, warm / cold",
            f"{r['start_warm_median_s']} s / {r['start_cold_median_s']} s",
            "target warm <= 0.25 s",
        ),
        (
            "+simple page via Caddy vs direct",
            f"{r['simple_page_caddy_median_ms']} / {r['simple_page_direct_median_ms']} ms",
            f"overhead {r['simple_page_overhead_pct']} % (target <= 10 %)",
        ),
        (
            "pip install, 10 packages: server / PyPI",
            f"{r['pip_server_s']} / {r['pip_direct_s']} s",
            f"{r['pip_ratio_server_vs_direct']}x",
        ),
        (
            "uv install, 10 packages: server / PyPI",
            f"{r['uv_server_s']} / {r['uv_direct_s']} s",
            f"{r['uv_ratio_server_vs_direct']}x (target <= 3x)",
        ),
        (
            "devpi-server RSS idle / peak",
            f"{r['devpi_rss_idle_mb']} / {r['devpi_rss_peak_mb']} MB",
            f"over {r['rss_window_min']} min of mirror traffic (target peak <= 600 MB)",
        ),
    ]
    lines = [
        f"# Benchmarks: {r['date']} on {r['machine']} (load {r['load_avg_at_start']:.2f} at start)",
        "",
        "| figure | value | against |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += [
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
