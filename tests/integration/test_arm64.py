"""aarch64, which the single file claims (its pex holds aarch64 wheels for CPython 3.10-3.13):
on an arm64 Debian 12 host run through qemu-user-static, the built dist/devpi-agent starts with the
host's arm64 /usr/bin/python3, imports bcrypt from its aarch64 wheel, and `plan` works.
A full apply under emulation is `make arm64-apply` (arm64_apply.py), outside `make test`.
"""

from __future__ import annotations

import json
import time

from agenthost import AGENT, CONFIG, Ports, config_text
from nspawn import NspawnHost

# In the agent's own venv: the machine, bcrypt's wheel tag, the ELF machine of its extension.
INSPECT = """
import json, platform, sys
import bcrypt, bcrypt._bcrypt as ext
from importlib.metadata import distribution
wheel = distribution("bcrypt").read_text("WHEEL") or ""
with open(ext.__file__, "rb") as so:
    elf = so.read(20)
print(json.dumps({
    "machine": platform.machine(),
    "python": sys.executable,
    "version": platform.python_version(),
    "tags": [l.split(":", 1)[1].strip() for l in wheel.splitlines() if l.startswith("Tag:")],
    "e_machine": int.from_bytes(elf[18:20], "little"),
    "hash_ok": bcrypt.checkpw(b"pw", bcrypt.hashpw(b"pw", bcrypt.gensalt(4))),
}))
"""
EM_AARCH64 = 183


def test_the_host_is_aarch64(arm64_host: NspawnHost) -> None:
    assert arm64_host.output(["uname", "-m"]) == "aarch64"
    # The python the agent's shebang names is an arm64 binary (ELF e_machine 183).
    head = arm64_host.path("/usr/bin/python3").resolve().read_bytes()[:20]
    assert int.from_bytes(head[18:20], "little") == EM_AARCH64


def test_the_agent_starts_and_imports_bcrypt_from_its_aarch64_wheel(
    arm64_host: NspawnHost,
) -> None:
    started = time.monotonic()
    version = arm64_host.run(["env", "-u", "HOME", AGENT, "version"], timeout=600)
    cold = time.monotonic() - started
    assert version.returncode == 0, version.stderr.decode()
    started = time.monotonic()
    arm64_host.run([AGENT, "version"], timeout=600)
    warm = time.monotonic() - started
    print(f"arm64 (emulated): agent start cold {cold:.1f} s, warm {warm:.1f} s")
    inspect = arm64_host.run([AGENT, "-c", INSPECT], env={"PEX_INTERPRETER": "1"}, timeout=600)
    assert inspect.returncode == 0, inspect.stderr.decode()
    found = json.loads(inspect.stdout)
    assert found["machine"] == "aarch64", found
    assert found["version"].startswith("3.11"), found
    assert found["tags"] and all(tag.endswith("aarch64") for tag in found["tags"]), found
    assert found["e_machine"] == EM_AARCH64, found
    assert found["hash_ok"] is True


def test_plan_works(arm64_host: NspawnHost) -> None:
    arm64_host.write(CONFIG, config_text(Ports.free()), mode=0o600)
    started = time.monotonic()
    plan = arm64_host.run(
        ["env", "-u", "HOME", AGENT, "plan", "--config", CONFIG], check=False, timeout=1200
    )
    seconds = time.monotonic() - started
    out = plan.stdout.decode(errors="replace")
    print(f"arm64 (emulated): plan on a fresh host {seconds:.1f} s")
    assert plan.returncode == 0, plan.stderr.decode()[-3000:] + out[-2000:]
    assert "failed=0" in out, out[-2000:]
    assert "apt: would install" in out, out[-2000:]
    # plan changed nothing: no package installed, no agent state.
    assert arm64_host.run(["dpkg-query", "-W", "caddy"], check=False).returncode != 0
    assert not arm64_host.path("/etc/caddy/Caddyfile").exists()
