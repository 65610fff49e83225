"""Local users: invitations, passwords, TOTP devices and lockout.

Secrets stay under /secrets and /state (see auth/storage.py); the `user` resource only records
that a password and which MFA devices exist, so `wardctl get users` shows nothing sensitive.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from wardgate.api.resources import User, UserSpec
from wardgate.audit.events import Emitter
from wardgate.auth import passwords, totp
from wardgate.auth import webauthn as wa
from wardgate.auth.storage import ResourceStore
from wardgate.auth.webauthn import WebAuthn, WebAuthnConfig, WebAuthnError
from wardgate.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BadParameterError,
    CompareFailedError,
    LockedError,
    NotFoundError,
    WardgateError,
)

INVITE_TTL = timedelta(hours=24)
PENDING_DEVICE_TTL = 300.0  # seconds to finish adding a device
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
DEVICE_TYPES = ("totp", "webauthn", "passkey")  # a passkey is a discoverable webauthn credential
WEBAUTHN_NOT_CONFIGURED = (
    "WebAuthn needs the proxy's public address: set proxy_service.public_addr "
    "or auth_service.authentication.webauthn.rp_id"
)


@dataclass
class AuthPreference:
    """The cluster's login policy (from `auth_service.authentication`)."""

    second_factor: str = "otp"  # otp | off | webauthn | on
    password_min_length: int = 12
    max_attempts: int = 5
    lockout_duration: timedelta = timedelta(minutes=30)
    passwordless: bool = False
    webauthn: WebAuthnConfig | None = None  # None: WebAuthn is not configured

    @property
    def otp_required(self) -> bool:
        """OTP is what registration and `ward login` ask for ("otp": only OTP; "on": OTP or WebAuthn)."""
        return self.second_factor in ("otp", "on")

    @property
    def webauthn_allowed(self) -> bool:
        return self.second_factor in ("webauthn", "on")

    @property
    def otp_usable(self) -> bool:
        """Whether an OTP device may answer an MFA check ("off": any device the user added)."""
        return self.second_factor != "webauthn"

    @property
    def webauthn_usable(self) -> bool:
        return self.second_factor != "otp" and self.webauthn is not None


def _invite_key(token: str) -> str:
    return "/invites/" + hashlib.sha256(token.encode()).hexdigest()


def _pw_key(user: str) -> str:
    return f"/secrets/users/{user}/password"


def _mfa_prefix(user: str) -> str:
    return f"/secrets/users/{user}/mfa/"


def _attempts_key(user: str) -> str:
    return f"/state/users/{user}/login"


def _pending_device_key(user: str) -> str:
    return f"/state/users/{user}/pending_device"


def _check_device_name(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_NAME.match(device):
        raise BadParameterError(
            "a device name is 1 to 40 letters, digits, dots, dashes or underscores (e.g. yubikey-5)"
        )
    return device


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
        self._wa: tuple[WebAuthnConfig, WebAuthn] | None = None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _webauthn(self) -> WebAuthn:
        """The relying party for the current preference (BadParameterError when not configured)."""
        cfg = self.prefs.webauthn
        if cfg is None or not cfg.rp_id:
            raise BadParameterError(WEBAUTHN_NOT_CONFIGURED)
        if self._wa is None or self._wa[0] is not cfg:
            self._wa = (cfg, WebAuthn(self.store, cfg, clock=self.clock, audit=self.audit))
        return self._wa[1]

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
        await wa.delete_credentials(self.store, name)  # with their credential-index entries
        for key, _ in await self.store.list_records(_mfa_prefix(name)):
            await self.store.delete_record(key)
        await self.store.delete_record(_attempts_key(name))
        await self.store.delete_record(_pending_device_key(name))
        await self.store.delete_record(wa.register_challenge_key(name))
        user.spec.has_password = False
        user.spec.mfa_devices = []
        user.spec.status.locked_until = None
        user.spec.status.lock_reason = ""
        await self.store.put(user)
        await self.audit.emit("user.update", user=by, name=name, action="reset")
        return await self._new_invite(name, by)

    async def delete(self, name: str, *, by: str) -> None:
        await self.store.delete("user", name)
        await wa.forget_user(self.store, name)  # the global credential and user-handle indexes
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
        """Look up an invite; prepare a TOTP seed (and its QR code) and/or WebAuthn creation options."""
        rec = await self.store.get_record(_invite_key(token))
        if rec is None:
            await self.audit.emit("user.register", success=False, error="invalid or expired invite")
            raise AuthenticationError(
                "this invitation is invalid or has expired: ask an administrator for a new one "
                "(wardctl users reset NAME)"
            )
        data, _ = rec
        name = data["user"]
        out: dict[str, Any] = {"user": name, "second_factor": self.prefs.second_factor, "webauthn": None}
        if self.prefs.otp_required:
            secret = data.get("totp_secret") or totp.new_totp_secret()
            if "totp_secret" not in data:
                data["totp_secret"] = secret
                await self.store.put_record(
                    _invite_key(token), data, expires=datetime.fromisoformat(data["expires"]).timestamp()
                )
            out["totp_secret"] = secret
            out["totp_uri"] = totp.totp_uri(secret, account=name, issuer=self.cluster_name)
            out["totp_qr_svg"] = totp.qr_svg(out["totp_uri"])
        # "on" without a configured relying party falls back to OTP; "webauthn" cannot.
        if self.prefs.second_factor == "webauthn" or (
            self.prefs.webauthn_allowed and self.prefs.webauthn is not None
        ):
            out["webauthn"] = await self._webauthn().registration_options(
                name, passkey=self.prefs.passwordless
            )
        return out

    async def complete_registration(
        self,
        token: str,
        password: str,
        otp_code: str = "",
        *,
        webauthn_response: Any = None,
        device_name: str = "",
    ) -> User:
        rec = await self.store.get_record(_invite_key(token))
        if rec is None:
            await self.audit.emit("user.register", success=False, error="invalid or expired invite")
            raise AuthenticationError("this invitation is invalid or has expired: ask for a new one")
        data, _ = rec
        name = data["user"]
        try:
            return await self._complete_registration(
                token, data, password, otp_code, webauthn_response, device_name
            )
        except WardgateError as exc:
            await self.audit.emit(
                "user.register", user=name, success=False, error=getattr(exc, "reason", str(exc))
            )
            raise

    async def _complete_registration(
        self,
        token: str,
        data: dict[str, Any],
        password: str,
        otp_code: str,
        webauthn_response: Any,
        device_name: str,
    ) -> User:
        name = data["user"]
        sf = self.prefs.second_factor
        use_webauthn = webauthn_response is not None
        if use_webauthn and not self.prefs.webauthn_allowed:
            raise BadParameterError(
                f"this cluster does not register passkeys or security keys (second_factor: {sf})"
                + (": enter the code from your authenticator app" if self.prefs.otp_required else "")
            )
        if sf == "webauthn" and not use_webauthn:
            raise BadParameterError(
                "this cluster requires a passkey or security key: register one through the invitation "
                "link in a browser"
            )
        device = _check_device_name(device_name or ("passkey" if use_webauthn else "otp"))
        passwords.check_password_policy(password, min_length=self.prefs.password_min_length, username=name)
        user = await self.get(name)
        step = None
        if use_webauthn:
            await self._webauthn().finish_registration(name, device, webauthn_response)
        elif self.prefs.otp_required:
            secret = data.get("totp_secret")
            if not secret:
                raise BadParameterError("start registration first: the authenticator seed was not issued")
            step = totp.verify_totp(secret, otp_code, last_used_step=None, now=self.clock())
            if step is None:
                err = AuthenticationError(
                    "the one-time code is not valid: check the authenticator clock and try the next code"
                )
                err.reason = "invalid OTP code"  # type: ignore[attr-defined]
                raise err
        await self.store.put_record(_pw_key(name), {"hash": passwords.hash_password(password)})
        if step is not None:
            await self._store_totp(name, device, data["totp_secret"], step)
        if use_webauthn or step is not None:
            user.spec.mfa_devices = sorted({*user.spec.mfa_devices, device})
        user.spec.has_password = True
        await self.store.put(user)
        await self.store.delete_record(_invite_key(token))
        await self.audit.emit(
            "user.register", user=name, device=device if (use_webauthn or step is not None) else None
        )
        return user

    async def _store_totp(self, user: str, device: str, secret: str, last_step: int | None) -> None:
        await self.store.put_record(
            _mfa_prefix(user) + device,
            {
                "type": "totp",
                "secret": secret,
                "last_step": last_step,
                "added": self._now().isoformat(),
                "last_used": None,
            },
        )

    # ---- login

    async def authenticate(
        self,
        name: str,
        password: str,
        otp_code: str = "",
        *,
        webauthn_response: Any = None,
        remote_addr: str = "",
    ) -> User:
        """Check password and second factor (OTP or a WebAuthn assertion), with lockout.

        A WebAuthn assertion must answer a challenge from `begin_login_challenge` (or
        `mfa_challenge`) for this same user. Every outcome is audited.
        """
        sf = self.prefs.second_factor
        if sf == "webauthn" and webauthn_response is None:
            # Said before the password is checked, so the answer tells a guesser nothing.
            await self.audit.emit(
                "user.login", user=name, success=False, error="no WebAuthn response", remote_addr=remote_addr
            )
            raise AuthenticationError(
                "this cluster requires a passkey or security key: sign in through the web UI"
            )
        user = await self._check_password(name, password, remote_addr)
        method = "local"
        if sf == "off":
            pass
        elif webauthn_response is not None:
            if not self.prefs.webauthn_allowed:
                await self._record_failure(name, user, "WebAuthn not allowed", remote_addr)
                raise AuthenticationError(
                    "this cluster accepts only one-time codes as a second factor, "
                    "not passkeys or security keys"
                )
            await self._verify_webauthn(name, user, webauthn_response, remote_addr, event="user.login")
            method = "webauthn"
        elif sf == "on" and not otp_code.strip():
            await self._record_failure(name, user, "no second factor", remote_addr)
            raise AuthenticationError(
                "a second factor is required: enter a one-time code or use a passkey or security key"
            )
        elif self.prefs.otp_required and not await self._check_totp(name, otp_code):
            await self._record_failure(name, user, "invalid OTP code", remote_addr)
            raise AuthenticationError("invalid one-time code (each code works once; wait for the next)")

        await self.store.delete_record(_attempts_key(name))
        await self.audit.emit("user.login", user=name, method=method, remote_addr=remote_addr)
        return user

    async def _check_password(self, name: str, password: str, remote_addr: str) -> User:
        """Lock status and password, at the same cost whether or not the user exists."""
        user = await self.store.find("user", name)
        pw_rec = await self.store.get_record(_pw_key(name)) if user else None
        stored_hash = pw_rec[0]["hash"] if pw_rec else None
        if isinstance(user, User):
            await self._refuse_if_locked(name, user, "user.login", remote_addr, password=password)
        ok = passwords.verify_password_or_dummy(stored_hash, password)
        if not ok or not isinstance(user, User):
            await self._record_failure(name, user, "invalid username or password", remote_addr)
            raise AuthenticationError("invalid username or password")
        return user

    async def _refuse_if_locked(
        self, name: str, user: User, event: str, remote_addr: str, *, password: str | None = None
    ) -> None:
        until_dt = user.spec.status.locked_until
        if not until_dt or until_dt <= self._now():
            return
        if password is not None:
            passwords.verify_password_or_dummy(None, password)  # same cost as a real check
        until = until_dt.strftime("%Y-%m-%d %H:%M:%S UTC")
        await self.audit.emit(
            event, user=name, success=False, error="user is locked", remote_addr=remote_addr
        )
        raise LockedError(f"user {name} is temporarily locked until {until} after too many failed logins")

    async def _verify_webauthn(
        self, name: str, user: User, response: Any, remote_addr: str, *, event: str
    ) -> wa.VerifiedLogin:
        """An assertion for a challenge issued for `name`; a failure counts toward lockout."""
        try:
            return await self._webauthn().verify_authentication(response, user=name)
        except WebAuthnError as exc:
            await self._record_failure(
                name,
                user,
                exc.reason,
                remote_addr,
                event=event,
                emit=not (exc.audited and event == "mfa.verify"),
            )
            raise
        except BadParameterError as exc:
            await self._record_failure(
                name, user, f"malformed WebAuthn response: {exc}", remote_addr, event=event
            )
            raise

    async def begin_login_challenge(
        self, name: str, password: str, *, remote_addr: str = ""
    ) -> dict[str, Any]:
        """Check the password, then issue a WebAuthn challenge for the user's passkeys/security keys."""
        rp = self._webauthn()
        if not self.prefs.webauthn_allowed:
            raise BadParameterError(
                "this cluster does not use passkeys or security keys for sign-in "
                f"(second_factor: {self.prefs.second_factor})"
            )
        await self._check_password(name, password, remote_addr)
        try:
            options = await rp.authentication_options(name)
        except AuthenticationError as exc:
            await self.audit.emit(
                "user.login", user=name, success=False, error=str(exc), remote_addr=remote_addr
            )
            raise
        return {"webauthn": options}

    async def begin_passwordless(self) -> dict[str, Any]:
        """A challenge any passkey of this cluster can answer (no allowCredentials, UV required)."""
        rp = self._webauthn()
        if not self.prefs.passwordless:
            raise BadParameterError(
                "passwordless sign-in is not enabled on this cluster "
                "(auth_service.authentication.passwordless): sign in with your password"
            )
        return {"webauthn": await rp.authentication_options(None)}

    async def authenticate_passwordless(self, webauthn_response: Any, *, remote_addr: str = "") -> User:
        """Sign in with a passkey alone: discoverable credential, user verified, userHandle -> user."""
        if not self.prefs.passwordless:
            await self.audit.emit(
                "user.login", success=False, error="passwordless disabled", remote_addr=remote_addr
            )
            raise BadParameterError(
                "passwordless sign-in is not enabled on this cluster: sign in with your password"
            )
        rp = self._webauthn()
        try:
            verified = await rp.verify_authentication(webauthn_response, user=None)
        except WebAuthnError as exc:
            user = await self.store.find("user", exc.user) if exc.user else None
            await self._record_failure(exc.user, user, exc.reason, remote_addr)
            raise
        except BadParameterError as exc:
            await self.audit.emit(
                "user.login",
                success=False,
                error=f"malformed WebAuthn response: {exc}",
                remote_addr=remote_addr,
            )
            raise
        name = verified.user
        found = await self.store.find("user", name)
        if not isinstance(found, User):
            await self.audit.emit("user.login", user=name, success=False, error="user no longer exists")
            raise AuthenticationError("this passkey belongs to a user that no longer exists")
        await self._refuse_if_locked(name, found, "user.login", remote_addr)
        await self.store.delete_record(_attempts_key(name))
        await self.audit.emit(
            "user.login", user=name, method="passwordless", device=verified.device, remote_addr=remote_addr
        )
        return found

    async def _check_totp(self, name: str, code: str) -> str | None:
        """The name of the TOTP device `code` came from (its step is then spent), or None."""
        if not isinstance(code, str) or not code.strip():
            return None
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
                return None
            data["last_step"] = step
            data["last_used"] = self._now().isoformat()
            try:
                await self.store.put_record(key, data, revision=rev)
            except CompareFailedError:
                return None  # a concurrent login used a code at the same moment: refuse the replay
            return key.rsplit("/", 1)[1]
        return None

    async def _record_failure(
        self,
        name: str,
        user: object,
        reason: str,
        remote_addr: str,
        *,
        event: str = "user.login",
        emit: bool = True,
    ) -> None:
        if emit:
            await self.audit.emit(
                event, user=name, success=False, error=reason, remote_addr=remote_addr or None
            )
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

    async def change_password(
        self, name: str, old: str, new: str, otp_code: str = "", *, webauthn_response: Any = None
    ) -> None:
        try:
            await self.authenticate(name, old, otp_code, webauthn_response=webauthn_response)
            passwords.check_password_policy(new, min_length=self.prefs.password_min_length, username=name)
        except WardgateError as exc:
            await self.audit.emit("user.password_change", user=name, success=False, error=str(exc))
            raise
        await self.store.put_record(_pw_key(name), {"hash": passwords.hash_password(new)})
        await self.audit.emit("user.password_change", user=name)

    # ---- MFA devices

    async def _devices(self, name: str) -> dict[str, dict[str, Any]]:
        prefix = _mfa_prefix(name)
        return {key[len(prefix) :]: dev for key, dev in await self.store.list_records(prefix)}

    async def mfa_devices(self, name: str) -> list[dict[str, Any]]:
        return [
            {
                "name": dev_name,
                "type": dev.get("type"),
                "added": dev.get("added"),
                "last_used": dev.get("last_used"),
            }
            for dev_name, dev in sorted((await self._devices(name)).items())
        ]

    async def mfa_challenge(self, name: str) -> dict[str, Any]:
        """What the user can answer an MFA check with: {"otp": bool, "webauthn": options or None}."""
        devices = (await self._devices(name)).values()
        otp = self.prefs.otp_usable and any(d.get("type") == "totp" for d in devices)
        options = None
        if self.prefs.webauthn_usable and any(d.get("type") == "webauthn" for d in devices):
            options = await self._webauthn().authentication_options(name)
        return {"otp": otp, "webauthn": options}

    async def verify_mfa(
        self, name: str, *, otp_code: str = "", webauthn_response: Any = None, remote_addr: str = ""
    ) -> str:
        """Check one of the user's existing factors; returns the device used. Failures count
        toward lockout, like failed logins."""
        user = await self.get(name)
        await self._refuse_if_locked(name, user, "mfa.verify", remote_addr)
        if webauthn_response is not None:
            if not self.prefs.webauthn_usable:
                self._webauthn()  # the clearer message when WebAuthn is not configured at all
                await self.audit.emit("mfa.verify", user=name, success=False, error="WebAuthn not allowed")
                raise AuthenticationError(
                    "this cluster accepts only one-time codes, not passkeys or security keys"
                )
            verified = await self._verify_webauthn(
                name, user, webauthn_response, remote_addr, event="mfa.verify"
            )
            device = verified.device
        elif isinstance(otp_code, str) and otp_code.strip():
            if not self.prefs.otp_usable:
                await self.audit.emit("mfa.verify", user=name, success=False, error="OTP not allowed")
                raise AuthenticationError(
                    "this cluster accepts only passkeys or security keys, not one-time codes"
                )
            found = await self._check_totp(name, otp_code)
            if found is None:
                await self._record_failure(name, user, "invalid OTP code", remote_addr, event="mfa.verify")
                raise AuthenticationError("invalid one-time code (each code works once; wait for the next)")
            device = found
        else:
            await self.audit.emit("mfa.verify", user=name, success=False, error="no second factor given")
            raise AuthenticationError(
                "confirm with a second factor: enter a one-time code or use your passkey or security key"
            )
        await self.audit.emit("mfa.verify", user=name, device=device, remote_addr=remote_addr or None)
        return device

    async def begin_add_device(
        self,
        name: str,
        device_type: str,
        device_name: str,
        *,
        otp_code: str = "",
        webauthn_response: Any = None,
    ) -> dict[str, Any]:
        """Start enrolling a device ("totp", "webauthn", or "passkey": a discoverable webauthn
        credential). A user who has devices proves one of them first."""
        try:
            return await self._begin_add_device(name, device_type, device_name, otp_code, webauthn_response)
        except WardgateError as exc:
            await self.audit.emit(
                "mfa.add",
                user=name,
                success=False,
                device=device_name,
                type=device_type,
                error=getattr(exc, "reason", str(exc)),
            )
            raise

    async def _begin_add_device(
        self, name: str, device_type: str, device_name: str, otp_code: str, webauthn_response: Any
    ) -> dict[str, Any]:
        _check_device_name(device_name)
        if device_type not in DEVICE_TYPES:
            raise BadParameterError(f"unknown device type {device_type!r}: use totp, webauthn or passkey")
        if device_type == "totp" and not self.prefs.otp_usable:
            raise BadParameterError("this cluster accepts only passkeys or security keys, not one-time codes")
        if device_type != "totp":
            self._webauthn()
            if not self.prefs.webauthn_usable:
                raise BadParameterError(
                    "this cluster accepts only one-time codes, not passkeys or security keys"
                )
        await self.get(name)
        devices = await self._devices(name)
        if device_name in devices:
            raise AlreadyExistsError(
                f'an MFA device named "{device_name}" already exists: choose another name'
            )
        if devices:
            await self.verify_mfa(name, otp_code=otp_code, webauthn_response=webauthn_response)
        if device_type == "totp":
            secret = totp.new_totp_secret()
            uri = totp.totp_uri(secret, account=name, issuer=self.cluster_name)
            await self.store.put_record(
                _pending_device_key(name),
                {"type": "totp", "name": device_name, "secret": secret},
                expires=self.clock() + PENDING_DEVICE_TTL,
            )
            return {"totp_secret": secret, "totp_uri": uri, "totp_qr_svg": totp.qr_svg(uri)}
        options = await self._webauthn().registration_options(name, passkey=device_type == "passkey")
        await self.store.put_record(
            _pending_device_key(name),
            {"type": "webauthn", "name": device_name},
            expires=self.clock() + PENDING_DEVICE_TTL,
        )
        return {"webauthn": options}

    async def finish_add_device(
        self, name: str, device_name: str, *, otp_code: str = "", webauthn_response: Any = None
    ) -> dict[str, Any]:
        """Prove the new device works (a code from it, or its attestation) and store it."""
        try:
            return await self._finish_add_device(name, device_name, otp_code, webauthn_response)
        except WardgateError as exc:
            await self.audit.emit(
                "mfa.add",
                user=name,
                success=False,
                device=device_name,
                error=getattr(exc, "reason", str(exc)),
            )
            raise

    async def _finish_add_device(
        self, name: str, device_name: str, otp_code: str, webauthn_response: Any
    ) -> dict[str, Any]:
        _check_device_name(device_name)
        rec = await self.store.get_record(_pending_device_key(name))
        if rec is None or rec[0].get("name") != device_name:
            raise BadParameterError(
                f'start adding the device "{device_name}" first (a started enrolment expires after 5 minutes)'
            )
        pending = rec[0]
        if await self.store.get_record(_mfa_prefix(name) + device_name) is not None:
            raise AlreadyExistsError(
                f'an MFA device named "{device_name}" already exists: choose another name'
            )
        if pending["type"] == "totp":
            step = totp.verify_totp(pending["secret"], otp_code, last_used_step=None, now=self.clock())
            if step is None:
                raise AuthenticationError(
                    "the code from the new authenticator is not valid: check its clock, enter the next code"
                )
            await self._store_totp(name, device_name, pending["secret"], step)
            added = self._now().isoformat()
        else:
            if webauthn_response is None:
                raise BadParameterError("answer with the new passkey or security key (its attestation)")
            try:
                record = await self._webauthn().finish_registration(name, device_name, webauthn_response)
            finally:
                await self.store.delete_record(_pending_device_key(name))  # its challenge is spent
            added = record["added"]
        await self.store.delete_record(_pending_device_key(name))
        await self._set_device_names(name)
        await self.audit.emit("mfa.add", user=name, device=device_name, type=pending["type"])
        return {"name": device_name, "type": pending["type"], "added": added}

    async def delete_device(
        self, name: str, device_name: str, *, otp_code: str = "", webauthn_response: Any = None
    ) -> None:
        """Remove a device after checking an existing factor; the last device that satisfies the
        cluster's second_factor cannot be removed while one is required."""
        try:
            await self._delete_device(name, device_name, otp_code, webauthn_response)
        except WardgateError as exc:
            await self.audit.emit(
                "mfa.delete",
                user=name,
                success=False,
                device=device_name,
                error=getattr(exc, "reason", str(exc)),
            )
            raise
        await self.audit.emit("mfa.delete", user=name, device=device_name)

    async def _delete_device(
        self, name: str, device_name: str, otp_code: str, webauthn_response: Any
    ) -> None:
        await self.get(name)
        devices = await self._devices(name)
        if device_name not in devices:
            raise NotFoundError(f'user {name} has no MFA device named "{device_name}"')
        rest = [d.get("type") for n, d in devices.items() if n != device_name]
        sf = self.prefs.second_factor
        usable = {"otp": ("totp",), "webauthn": ("webauthn",), "on": ("totp", "webauthn")}.get(sf)
        if usable is not None and not any(t in usable for t in rest):
            raise BadParameterError(
                f'"{device_name}" is your last device this cluster accepts as a second factor '
                f"(second_factor: {sf}): add another device before removing it"
            )
        await self.verify_mfa(name, otp_code=otp_code, webauthn_response=webauthn_response)
        rec = await self.store.get_record(_mfa_prefix(name) + device_name)
        if rec is None:
            raise NotFoundError(f'user {name} has no MFA device named "{device_name}"')
        if rec[0].get("type") == "webauthn":
            await wa.delete_credential_record(self.store, name, device_name, rec[0])
        else:
            await self.store.delete_record(_mfa_prefix(name) + device_name)
        await self._set_device_names(name)

    async def _set_device_names(self, name: str) -> None:
        """Mirror the stored devices into user.spec.mfa_devices (what `wardctl get users` shows)."""
        for _ in range(10):
            user = await self.get(name)
            user.spec.mfa_devices = sorted(await self._devices(name))
            try:
                await self.store.put(user)
                return
            except CompareFailedError:
                continue
        raise CompareFailedError(f"user {name} kept changing while its MFA devices were updated; retry")

    async def exists(self, name: str) -> bool:
        try:
            await self.get(name)
        except NotFoundError:
            return False
        return True
