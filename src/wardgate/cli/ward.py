"""`ward`: the user's client."""

from __future__ import annotations

import sys

import click

from wardgate import __version__, runtime
from wardgate.cli.output import console, guarded
from wardgate.errors import AuthenticationError, BadParameterError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ward")
def main() -> None:
    """Reach servers, databases, apps and clusters through Wardgate."""


@main.command()
@click.option(
    "--proxy", required=True, help="Cluster address HOST:PORT (the auth service, or the proxy once it runs)."
)
@click.option("--invite", "token", required=True, help="The invitation token `wardctl users add` printed.")
@click.option(
    "--ca-pin", default="", help="Pin of the cluster CA from `wardctl status` (trust on first use)."
)
@click.option("--insecure", is_flag=True, help="Trust the cluster without a pin (development only).")
@guarded
def register(proxy: str, token: str, ca_pin: str, insecure: bool) -> None:
    """Accept an invitation: set a password and enrol an authenticator app."""
    from wardgate.api.client import AuthClient
    from wardgate.api.identityfile import server_trusting_context
    from wardgate.auth.totp import qr_text

    pems = runtime.run(AuthClient.discover_trust(proxy, ca_pin=ca_pin, insecure=insecure))

    async def begin() -> dict:
        async with AuthClient(proxy, server_trusting_context(pems)) as c:
            return await c.begin_registration(token)

    info = runtime.run(begin())
    console.print(f"Welcome, [bold]{info['user']}[/]. Choose a password (at least 12 characters).")
    while True:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Confirm password")
        if len(password) >= 12:
            break
        console.print("That password is too short: use at least 12 characters.")
    otp = ""
    if info.get("totp_uri"):
        console.print("\nScan this QR code with your authenticator app (or enter the secret by hand):")
        console.print(qr_text(info["totp_uri"], ansi=sys.stdout.isatty()), markup=False)
        console.print(f"Secret: {info['totp_secret']}\nURI: {info['totp_uri']}", markup=False)
        otp = click.prompt("Enter the 6-digit code the app shows", type=str).strip()

    async def complete() -> dict:
        async with AuthClient(proxy, server_trusting_context(pems)) as c:
            return await c.complete_registration(token, password, otp)

    try:
        done = runtime.run(complete())
    except (AuthenticationError, BadParameterError) as exc:
        raise type(exc)(f"registration failed: {exc}") from None
    console.print(
        f"\nUser {done['user']} is registered with roles {', '.join(done['roles'])}. You can now log in."
    )


if __name__ == "__main__":
    main()
