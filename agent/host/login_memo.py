"""Which devpi logins already succeeded against devpi's database as it still is, so a no-op
`apply` skips devpi's argon2 check of every user's password (0.2 s a user).

A proof is an HMAC, under a random key of its own (root-only), of the user, the password, and
devpi's database uuid and serial at the time the login succeeded. Every write to devpi's
database moves the serial on, so a password changed in devpi behind the agent's back (or a new
database: a restore, an import, a reinitialised server) makes every proof worthless and the
users' logins are checked again. An upload or a mirror fetch moves the serial too: the next
apply then checks the logins once more, as it did on every run before the memo.

Proofs are saved only by a run that found nothing to change in devpi: a run that changed
something saw the serial before its own writes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from agent.core.context import Context
from agent.core.paths import STATE_DIR

MEMO = STATE_DIR / "devpi-logins.memo"
MEMO_KEY = STATE_DIR / "devpi-logins.memo-key"
KEY_BYTES = 32


class LoginMemo:
    def __init__(self, ctx: Context, uuid: str | None, serial: str | None) -> None:
        self.ctx = ctx
        # Without devpi's uuid and serial there is nothing to tie a proof to: no memo.
        self.state = f"{uuid}\0{serial}" if uuid and serial else None
        self.key = _key(ctx) if self.state else None
        self.proofs: dict[str, str] = {}
        for line in (ctx.files.read(MEMO) or "").splitlines():
            name, _, proof = line.partition(" ")
            self.proofs[name] = proof

    def _proof(self, name: str, password: str) -> str | None:
        if self.key is None or self.state is None:
            return None
        message = "\0".join(("devpi-login", self.state, name, password)).encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def confirmed(self, name: str, password: str) -> bool:
        wanted = self._proof(name, password)
        return wanted is not None and hmac.compare_digest(self.proofs.get(name, ""), wanted)

    def save(self, logins: dict[str, str]) -> None:
        """Record these (user -> password) logins as confirmed at this uuid and serial."""
        if self.ctx.check or self.key is None:
            return
        lines = "".join(f"{name} {self._proof(name, pw)}\n" for name, pw in logins.items())
        self.ctx.files.ensure_file(MEMO, lines, mode=0o600, record=False)


def _key(ctx: Context) -> bytes | None:
    """The memo's HMAC key, generated once (0600 root); None in check mode before it exists."""
    text = (ctx.files.read(MEMO_KEY) or "").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        if ctx.check:
            return None
        # A missing or damaged key: a new one makes every old proof worthless, as it should.
        text = secrets.token_hex(KEY_BYTES)
    if not ctx.check:
        ctx.files.ensure_dir(MEMO_KEY.parent, mode=0o700, record=False)
        ctx.files.ensure_file(MEMO_KEY, text + "\n", mode=0o600, secret=True, record=False)
    return bytes.fromhex(text)
