"""Local users: invitations, passwords, TOTP devices and lockout.

Secrets stay under /secrets and /state (see auth/storage.py); the `user` resource only records
that a password and which MFA devices exist, so `wardctl get users` shows nothing sensitive.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from wardgate.api.resources import User, UserSpec
from wardgate.audit.events import Emitter
from wardgate.auth import passwords, totp
from wardgate.auth.storage import ResourceStore
from wardgate.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BadParameterError,
    CompareFailedError,
    LockedError,
    NotFoundError,
)

INVITE_TTL = timedelta(hours=24)


@dataclass
class AuthPreference:
    """The cluster's login policy (from `auth_service.authentication`)."""

    second_factor: str = "otp"  # otp | off | webauthn | on
    password_min_length: int = 12
    max_attempts: int = 5
    lockout_duration: timedelta = timedelta(minutes=30)

    @property
    def otp_required(self) -> bool:
        return self.second_factor in ("otp", "on")


def _invite_key(token: str) -> str:
    return "/invites/" + hashlib.sha256(token.encode()).hexdigest()


def _pw_key(user: str) -> str:
    return f"/secrets/users/{user}/password"


def _mfa_prefix(user: str) -> str:
    return f"/secrets/users/{user}/mfa/"


def _attempts_key(user: str) -> str:
    return f"/state/users/{user}/login"


@dataclass
class Invite:
    token: str
    user: str
    expires: datetime


class UserManager:
    def __init__(
        self,
        store: ResourceStore,
        audit: Emitter,
        prefs: AuthPreference,
        *,
        cluster_name: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.audit = audit
        self.prefs = prefs
        self.cluster_name = cluster_name
        self.clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def get(self, name: str) -> User:
        return await self.store.get("user", name)  # type: ignore[return-value]

    # ---- lifecycle

    async def create(
        self, name: str, *, roles: list[str], traits: dict[str, list[str]], created_by: str
    ) -> tuple[User, Invite]:
        user = User.new(
            name, UserSpec(roles=roles, traits=traits, created=self._now(), created_by=created_by)
        )
        try:
            user = await self.store.create(user)
        except Exception as exc:
            await self.audit.emit("user.create", user=created_by, success=False, name=name, error=str(exc))
            raise
        await self.audit.emit("user.create", user=created_by, name=name, roles=roles)
        invite = await self._new_invite(name, created_by)
        return user, invite

    async def reset(self, name: str, *, by: str) -> Invite:
        """Forget the password and MFA devices; the user must register again."""
        user = await self.get(name)
        await self.store.delete_record(_pw_key(name))
        for key, _ in await self.store.list_records(_mfa_prefix(name)):
            await self.store.delete_record(key)
        await self.store.delete_record(_attempts_key(name))
        user.spec.has_password = False
        user.spec.mfa_devices = []
        user.spec.status.locked_until = None
        user.spec.status.lock_reason = ""
        await self.store.put(user)
        await self.audit.emit("user.update", user=by, name=name, action="reset")
        return await self._new_invite(name, by)

    async def delete(self, name: str, *, by: str) -> None:
        await self.store.delete("user", name)
        await self.store.backend.delete_range(f"/secrets/users/{name}/")
        await self.store.backend.delete_range(f"/state/users/{name}/")
        await self.audit.emit("user.delete", user=by, name=name)

    async def _new_invite(self, name: str, by: str) -> Invite:
        token = secrets.token_urlsafe(24)
        expires = self._now() + INVITE_TTL
        await self.store.put_record(
            _invite_key(token), {"user": name, "expires": expires.isoformat()}, expires=expires.timestamp()
        )
        await self.audit.emit("user.invite", user=by, name=name, expires=expires.isoformat())
        return Invite(token, name, expires)

    # ---- registration (invite -> password + first MFA device)

    async def begin_registration(self, token: str) -> dict[str, Any]:
        """Look up an invite and prepare a TOTP seed the user's app will scan."""
        rec = await self.store.get_record(_invite_key(token))
        if rec is None:
            await self.audit.emit("user.register", success=False, error="invalid or expired invite")
            raise AuthenticationError(
                "this invitation is invalid or has expired: ask an administrator for a new one "
                "(wardctl users reset NAME)"
            )
        data, _ = rec
        out: dict[str, Any] = {"user": data["user"], "second_factor": self.prefs.second_factor}
        if self.prefs.otp_required:
            secret = data.get("totp_secret") or totp.new_totp_secret()
            if "totp_secret" not in data:
                data["totp_secret"] = secret
                await self.store.put_record(
                    _invite_key(token), data, expires=datetime.fromisoformat(data["expires"]).timestamp()
                )
            out["totp_secret"] = secret
            out["totp_uri"] = totp.totp_uri(secret, account=data["user"], issuer=self.cluster_name)
        return out

    async def complete_registration(self, token: str, password: str, otp_code: str = "") -> User:
        rec = await self.store.get_record(_invite_key(token))
        if rec is None:
            await self.audit.emit("user.register", success=False, error="invalid or expired invite")
            raise AuthenticationError("this invitation is invalid or has expired: ask for a new one")
        data, _ = rec
        name = data["user"]
        passwords.check_password_policy(password, min_length=self.prefs.password_min_length, username=name)
        user = await self.get(name)
        step = None
        if self.prefs.otp_required:
            secret = data.get("totp_secret")
            if not secret:
                raise BadParameterError("start registration first: the authenticator seed was not issued")
            step = totp.verify_totp(secret, otp_code, last_used_step=None, now=self.clock())
            if step is None:
                await self.audit.emit("user.register", user=name, success=False, error="invalid OTP code")
                raise AuthenticationError(
                    "the one-time code is not valid: check the authenticator clock and try the next code"
                )
        await self.store.put_record(_pw_key(name), {"hash": passwords.hash_password(password)})
        if step is not None:
            await self._store_totp(name, "otp", data["totp_secret"], step)
            user.spec.mfa_devices = sorted({*user.spec.mfa_devices, "otp"})
        user.spec.has_password = True
        await self.store.put(user)
        await self.store.delete_record(_invite_key(token))
        await self.audit.emit("user.register", user=name)
        return user

    async def _store_totp(self, user: str, device: str, secret: str, last_step: int | None) -> None:
        await self.store.put_record(
            _mfa_prefix(user) + device,
            {"type": "totp", "secret": secret, "last_step": last_step, "added": self._now().isoformat()},
        )

    # ---- login

    async def authenticate(
        self, name: str, password: str, otp_code: str = "", *, remote_addr: str = ""
    ) -> User:
        """Check password and second factor, with lockout; every outcome is audited."""
        user = await self.store.find("user", name)
        pw_rec = await self.store.get_record(_pw_key(name)) if user else None
        stored_hash = pw_rec[0]["hash"] if pw_rec else None
        now = self._now()

        if isinstance(user, User) and user.spec.status.locked_until and user.spec.status.locked_until > now:
            passwords.verify_password_or_dummy(None, password)  # same cost as a real check
            until = user.spec.status.locked_until.strftime("%Y-%m-%d %H:%M:%S UTC")
            await self.audit.emit(
                "user.login", user=name, success=False, error="user is locked", remote_addr=remote_addr
            )
            raise LockedError(f"user {name} is temporarily locked until {until} after too many failed logins")

        ok = passwords.verify_password_or_dummy(stored_hash, password)
        if not ok or user is None:
            await self._record_failure(name, user, "invalid username or password", remote_addr)
            raise AuthenticationError("invalid username or password")

        if self.prefs.second_factor == "webauthn":
            raise AuthenticationError(
                "this cluster requires a security key or passkey: sign in through the web UI"
            )
        if self.prefs.otp_required and not await self._check_totp(name, otp_code):
            await self._record_failure(name, user, "invalid OTP code", remote_addr)
            raise AuthenticationError("invalid one-time code (each code works once; wait for the next)")

        await self.store.delete_record(_attempts_key(name))
        await self.audit.emit("user.login", user=name, method="local", remote_addr=remote_addr)
        return user  # type: ignore[return-value]

    async def _check_totp(self, name: str, code: str) -> bool:
        for key, dev in await self.store.list_records(_mfa_prefix(name)):
            if dev.get("type") != "totp":
                continue
            step = totp.verify_totp(
                dev["secret"], code, last_used_step=dev.get("last_step"), now=self.clock()
            )
            if step is None:
                continue
            rec = await self.store.get_record(key)
            if rec is None:
                continue
            data, rev = rec
            if data.get("last_step") is not None and data["last_step"] >= step:
                return False
            data["last_step"] = step
            try:
                await self.store.put_record(key, data, revision=rev)
            except CompareFailedError:
                return False  # a concurrent login used a code at the same moment: refuse the replay
            return True
        return False

    async def _record_failure(self, name: str, user: object, reason: str, remote_addr: str) -> None:
        await self.audit.emit("user.login", user=name, success=False, error=reason, remote_addr=remote_addr)
        if not isinstance(user, User):
            return
        failures = await self._count_failure(name)
        if failures < self.prefs.max_attempts:
            return
        until = self._now() + self.prefs.lockout_duration
        fresh = await self.get(name)
        fresh.spec.status.locked_until = until
        fresh.spec.status.lock_reason = "too many failed logins"
        await self.store.put(fresh)
        await self.store.delete_record(_attempts_key(name))
        await self.audit.emit(
            "user.locked",
            user=name,
            success=False,
            until=until.isoformat(),
            reason=f"{failures} failed logins",
        )

    async def _count_failure(self, name: str) -> int:
        """Atomically bump the failure counter (concurrent guesses must all count)."""
        key = _attempts_key(name)
        while True:
            rec = await self.store.get_record(key)
            try:
                if rec is None:
                    await self.store.backend.create(key, json.dumps({"failures": 1}).encode())
                    return 1
                data, rev = rec
                data["failures"] = int(data.get("failures", 0)) + 1
                await self.store.put_record(key, data, revision=rev)
                return data["failures"]
            except (CompareFailedError, AlreadyExistsError, NotFoundError):
                continue

    async def unlock(self, name: str, *, by: str) -> None:
        user = await self.get(name)
        user.spec.status.locked_until = None
        user.spec.status.lock_reason = ""
        await self.store.put(user)
        await self.store.delete_record(_attempts_key(name))
        await self.audit.emit("user.update", user=by, name=name, action="unlock")

    async def change_password(self, name: str, old: str, new: str, otp_code: str = "") -> None:
        await self.authenticate(name, old, otp_code)
        passwords.check_password_policy(new, min_length=self.prefs.password_min_length, username=name)
        await self.store.put_record(_pw_key(name), {"hash": passwords.hash_password(new)})
        await self.audit.emit("user.password_change", user=name)

    async def mfa_devices(self, name: str) -> list[dict[str, Any]]:
        return [
            {"name": key.rsplit("/", 1)[1], "type": dev.get("type"), "added": dev.get("added")}
            for key, dev in await self.store.list_records(_mfa_prefix(name))
        ]

    async def exists(self, name: str) -> bool:
        try:
            await self.get(name)
        except NotFoundError:
            return False
        return True
