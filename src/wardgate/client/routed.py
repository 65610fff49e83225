"""What per-resource logins (`ward db login`, `ward app login`) have in common: a certificate
routed to one named resource, a small `<NAME>.yaml` next to it, and the store that keeps them
in a folder of the profile's keys (``~/.ward/keys/<proxy>/<user>-<kind>/``, 0700).

`wardgate.client.db` and `wardgate.client.app` say what differs: the noun in messages
("database", "app"), the `ward` command group ("db", "app"), the files of one login, what the
yaml holds, and the exception a missing or unusable login raises.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import yaml
from cryptography import x509

from wardgate.api.identityfile import server_trusting_context
from wardgate.api.resources import NAME_RE
from wardgate.client.profile import NotLoggedInError, Profile, atomic_write, parse_utc, private_dir
from wardgate.errors import AccessDeniedError, BadParameterError, WardgateError
from wardgate.keys import public_key_pem


def check_resource_name(name: str, noun: str, listing: str) -> str:
    """NAME as the cluster spells resource names, else a refusal that says where to look."""
    if not NAME_RE.match(name or ""):
        raise BadParameterError(f"bad {noun} name {name!r}: `{listing}` lists the names")
    return name


class RoutedLogin:
    """Mixin for the login dataclasses: expiry, the TLS context to the proxy, the saved yaml.

    A subclass has the fields `name`, `valid_until` and `folder`, provides `key_path`, `alpn`,
    `ca_pems()` and `to_dict()`, and names the rest as class keywords (`noun`, `command`,
    `error`, `expired_error`, `cert_suffix`).
    """

    noun: ClassVar[str]
    """How messages name the resource: "database", "app"."""
    command: ClassVar[str]
    """The `ward` command group: "db", "app"."""
    error: ClassVar[type[NotLoggedInError]]
    """What a missing or unusable login raises."""
    expired_error: ClassVar[type[NotLoggedInError]]
    cert_suffix: ClassVar[str]
    """What follows NAME in the certificate's file name."""

    def __init_subclass__(
        cls,
        *,
        noun: str,
        command: str,
        error: type[NotLoggedInError],
        expired_error: type[NotLoggedInError],
        cert_suffix: str,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.noun, cls.command, cls.error, cls.expired_error = noun, command, error, expired_error
        cls.cert_suffix = cert_suffix

    name: str
    valid_until: datetime
    folder: Path
    # Annotations only (a class attribute here would become a dataclass field's default):
    # each login class has these as fields or properties.
    key_path: Path
    alpn: str

    @property
    def cert_path(self) -> Path:
        return self.folder / f"{self.name}{self.cert_suffix}"

    @property
    def meta_path(self) -> Path:
        return self.folder / f"{self.name}.yaml"

    @property
    def relogin(self) -> str:
        """The command that gets a new certificate for this resource."""
        return f"ward {self.command} login {self.name}"

    def is_expired(self, now: datetime | None = None, margin: timedelta = timedelta(0)) -> bool:
        return (now or datetime.now(UTC)) + margin >= self.valid_until

    def require_valid(self, now: datetime | None = None) -> Any:
        if self.is_expired(now):
            raise self.expired_error(
                f'your certificate for {self.noun} "{self.name}" expired at '
                f"{self.valid_until:%Y-%m-%d %H:%M:%S} UTC: run `{self.relogin}` again"
            )
        return self

    def ca_pems(self) -> list[str]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """What `<NAME>.yaml` holds."""
        raise NotImplementedError

    def ssl_context(self) -> ssl.SSLContext:
        """Mutual TLS to the proxy: this login's certificate out, the cluster's host CA in."""
        ctx = server_trusting_context(self.ca_pems())
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        except (FileNotFoundError, ssl.SSLError) as exc:
            raise self.error(
                f'cannot load your certificate for {self.noun} "{self.name}" ({exc}): '
                f"run `{self.relogin}` again"
            ) from None
        ctx.set_alpn_protocols([self.alpn])
        return ctx


L = TypeVar("L", bound=RoutedLogin)


class LoginStore(Generic[L]):
    """The saved logins of one kind for one profile: `<NAME>.yaml` plus the files `files` names.

    Messages name the resource as `login_class` does (its `noun`, `command` and `error`)."""

    login_class: ClassVar[type[RoutedLogin]]
    folder_suffix: ClassVar[str]
    """The store's folder is `<user><folder_suffix>` in the profile's key folder."""
    files: ClassVar[tuple[str, ...]]
    """What follows NAME in the file names of one login (`.yaml` first)."""
    login_args: ClassVar[str] = ""
    """Added to the `ward … login NAME` a missing login is told to run."""
    renew_margin: ClassVar[timedelta] = timedelta(0)
    """`current` wants at least this much validity left."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.folder = profile.key_dir / f"{profile.user}{self.folder_suffix}"

    @property
    def noun(self) -> str:
        return self.login_class.noun

    @property
    def command(self) -> str:
        return self.login_class.command

    @property
    def error(self) -> type[NotLoggedInError]:
        return self.login_class.error

    @staticmethod
    def check_name(name: str) -> str:
        raise NotImplementedError

    def from_yaml(self, name: str, data: Any, valid_until: datetime) -> L:
        """The login `<NAME>.yaml` describes (KeyError, TypeError, … where it is damaged)."""
        raise NotImplementedError

    def usable(self, login: L) -> bool:
        """Can the saved login be used as it is (beyond being valid a while yet)?"""
        return True

    def _login(self, name: str, data: Any) -> L:
        try:
            return self.from_yaml(name, data, parse_utc(data["valid_until"]))
        except (KeyError, TypeError, ValueError, AttributeError, WardgateError):
            raise self.error(
                f'the saved login for {self.noun} "{name}" is damaged: '
                f"run `ward {self.command} login {name}` again"
            ) from None

    def find(self, name: str) -> L | None:
        self.check_name(name)
        try:
            data = yaml.safe_load((self.folder / f"{name}.yaml").read_text())
        except FileNotFoundError:
            return None
        except yaml.YAMLError:
            data = None
        return self._login(name, data)

    def load(self, name: str) -> L:
        found = self.find(name)
        if found is None:
            raise self.error(
                f'not logged in to {self.noun} "{name}": '
                f"run `ward {self.command} login {name}{self.login_args}`"
            )
        return found

    def current(self, name: str, margin: timedelta | None = None) -> L | None:
        """The saved login if it can be used right now (valid a while yet, and `usable`)."""
        margin = self.renew_margin if margin is None else margin
        with contextlib.suppress(self.error):
            found = self.find(name)
            if found is not None and not found.is_expired(margin=margin) and self.usable(found):
                return found
        return None

    def logins(self) -> list[L]:
        out = []
        if self.folder.is_dir():
            for p in sorted(self.folder.glob("*.yaml")):
                name = p.name[: -len(".yaml")]
                if NAME_RE.match(name):
                    with contextlib.suppress(self.error):
                        if (found := self.find(name)) is not None:
                            out.append(found)
        return out

    @staticmethod
    def _check_cert(cert: x509.Certificate, key: Any) -> None:
        """Before anything is written: is the certificate for our key?"""
        if public_key_pem(cert.public_key()) != public_key_pem(key):
            raise WardgateError("the cluster returned a certificate for a different key: not saving it")

    def _write(self, login: L, cert_pem: str) -> L:
        """The certificate, then the small yaml last: it never points at missing files."""
        atomic_write(login.cert_path, cert_pem.strip() + "\n", 0o644)
        atomic_write(login.meta_path, yaml.safe_dump(login.to_dict(), sort_keys=False), 0o600)
        return login

    def remove(self, name: str) -> bool:
        """Forget NAME's login (its files); True if there was one."""
        self.check_name(name)
        found = False
        for suffix in self.files:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{name}{suffix}").unlink()
                found = True
        self.removed(name, found)
        return found

    def removed(self, name: str, found: bool) -> None:
        """Tidy up after `remove` (an emptied folder, …)."""

    def make_folder(self) -> None:
        private_dir(self.folder)


def session_factor(
    entry: Mapping[str, Any], ask_code: Callable[[], str] | None, refusal: str
) -> dict[str, str]:
    """The one-time code for a certificate, when the roles want a second factor per session
    (the certificate then lasts a minute); `refusal` when there is no one to ask."""
    if not entry.get("require_session_mfa"):
        return {}
    if ask_code is None:
        raise AccessDeniedError(refusal)
    return {"otp": ask_code()}


def issued_cert(profile: Profile, resp: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The certificate and the host CA certificates the cluster answered with."""
    cert_pem = str(resp.get("tls_cert") or "")
    if not cert_pem:
        raise WardgateError(f"the proxy at {profile.proxy} answered without a certificate")
    return cert_pem, [str(p) for p in resp.get("host_ca_pems") or []]
