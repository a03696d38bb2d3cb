"""A small client for devpi-server's JSON API on loopback (stdlib urllib only).

Passwords go in request bodies, never in URLs or argv. One root login per run gives a token for
X-Devpi-Auth; sending Basic credentials instead would cost devpi an argon2 check per request.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from agent.core import direct_http


class DevpiError(Exception):
    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"devpi {method} {path} answered {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class RemoteIndex:
    name: str
    bases: tuple[str, ...]
    type: str = "stage"
    # A mirror's mirror_no_project_list: True when it asks upstream per project only.
    no_project_list: bool = False


# The PyPI mirror as devpi-init makes it, plus mirror_no_project_list (see DevpiConfig).
PYPI_MIRROR_CONFIG: dict[str, Any] = {
    "type": "mirror",
    "title": "PyPI",
    "mirror_url": "https://pypi.org/simple/",
    "mirror_web_url_fmt": "https://pypi.org/project/{name}/",
    "volatile": False,
}


@dataclass(frozen=True)
class RemoteUser:
    name: str
    indexes: dict[str, RemoteIndex]


class DevpiApi:
    def __init__(self, port: int, timeout: float = 60) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        self.auth_header: str | None = None
        # devpi's database as of the last answer: its uuid and serial (every write to devpi's
        # database, a password change included, moves the serial on).
        self.uuid: str | None = None
        self.serial: str | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.auth_header:
            request.add_header("X-Devpi-Auth", self.auth_header)
        try:
            with direct_http.urlopen(request, timeout=self.timeout) as response:
                self._note_state(response.headers)
                return response.status, _json(response.read())
        except urllib.error.HTTPError as error:
            self._note_state(error.headers)
            return error.code, _json(error.read())

    def _note_state(self, headers: Any) -> None:
        if headers is not None:
            self.uuid = headers.get("X-Devpi-Uuid") or self.uuid
            self.serial = headers.get("X-Devpi-Serial") or self.serial

    def checked(
        self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201)
    ) -> Any:
        status, payload = self.request(method, path, body)
        if status not in ok:
            message = payload.get("message") if isinstance(payload, dict) else None
            raise DevpiError(method, path, status, str(message or payload)[:300])
        return payload

    def login_token(self, user: str, password: str) -> str | None:
        """The X-Devpi-Auth value for a login, or None when the password is wrong."""
        status, payload = self.request("POST", "/+login", {"user": user, "password": password})
        if status == 401:
            return None
        if status != 200:
            raise DevpiError("POST", "/+login", status, str(payload)[:300])
        token = payload["result"]["password"]
        return base64.b64encode(f"{user}:{token}".encode()).decode()

    def password_matches(self, user: str, password: str) -> bool:
        return self.login_token(user, password) is not None

    def login(self, user: str, password: str) -> bool:
        self.auth_header = self.login_token(user, password)
        return self.auth_header is not None

    def users(self) -> dict[str, RemoteUser]:
        payload = self.checked("GET", "/")
        users: dict[str, RemoteUser] = {}
        for name, info in payload["result"].items():
            indexes = {
                index: RemoteIndex(
                    f"{name}/{index}",
                    tuple(cfg.get("bases", ())),
                    cfg.get("type", "stage"),
                    bool(cfg.get("mirror_no_project_list", False)),
                )
                for index, cfg in (info.get("indexes") or {}).items()
            }
            users[name] = RemoteUser(name, indexes)
        return users

    def create_user(self, user: str, password: str) -> None:
        self.checked("PUT", f"/{user}", {"password": password})

    def set_password(self, user: str, password: str) -> None:
        self.checked("PATCH", f"/{user}", {"password": password})

    def create_index(self, user: str, index: str, bases: tuple[str, ...]) -> None:
        self.checked("PUT", f"/{user}/{index}", {"type": "stage", "bases": list(bases)})

    def set_bases(self, user: str, index: str, bases: tuple[str, ...]) -> None:
        self.checked("PATCH", f"/{user}/{index}", {"bases": list(bases)})

    def create_pypi_mirror(self, user: str, index: str, *, no_project_list: bool) -> None:
        config = {**PYPI_MIRROR_CONFIG, "mirror_no_project_list": no_project_list}
        self.checked("PUT", f"/{user}/{index}", config)

    def set_no_project_list(self, user: str, index: str, no_project_list: bool) -> None:
        # Not a GET first: a mirror's JSON lists every project it knows, ~930k names for PyPI.
        self.checked("PATCH", f"/{user}/{index}", {"mirror_no_project_list": no_project_list})

    def delete_index(self, user: str, index: str) -> None:
        self.checked("DELETE", f"/{user}/{index}")

    def delete_user(self, user: str) -> None:
        """Deletes the user and every index it owns, uploads included."""
        self.checked("DELETE", f"/{user}")

    def projects(self, user: str, index: str) -> list[str]:
        """The projects uploaded to a stage index (not those it inherits from its bases)."""
        payload = self.checked("GET", f"/{user}/{index}")
        return sorted(payload["result"].get("projects") or [])


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"message": raw[:300].decode("utf-8", "replace")}
