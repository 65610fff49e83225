"""`wardgate`: the daemon."""

from __future__ import annotations

import logging

import click

from wardgate import __version__
from wardgate.cli.output import console, guarded


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wardgate")
def main() -> None:
    """Wardgate: identity-aware access to SSH, Kubernetes, apps, databases and desktops."""


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (wardgate.yaml). Without it, the embedded defaults run.",
)
@click.option("--data-dir", help="Where state lives (default ./wardgate-data, or the config's data_dir).")
@click.option("-d", "--debug", is_flag=True, help="Verbose logging.")
@guarded
def start(config_path: str | None, data_dir: str | None, debug: bool) -> None:
    """Start the services the config enables (embedded default: auth on 127.0.0.1:3025)."""
    from wardgate import runtime
    from wardgate.config import default_config, load_config
    from wardgate.service.process import Started, WardgateProcess

    cfg = load_config(config_path) if config_path else default_config(data_dir)
    if data_dir and config_path:
        cfg.wardgate.data_dir = data_dir
    runtime.setup_logging("debug" if debug else cfg.wardgate.log.severity, cfg.wardgate.log.format)
    tuned = runtime.tune_allocator()
    if tuned:
        logging.getLogger("wardgate").debug("allocator tuned: %s", ", ".join(tuned))

    def started(s: Started) -> None:
        console.print(f"[bold]Wardgate {__version__}[/] cluster [bold]{s.cluster_name}[/] is up.")
        rows = [("services", ", ".join(x.removesuffix("_service") for x in s.services))]
        if s.unavailable:
            names = ", ".join(x.removesuffix("_service") for x in s.unavailable)
            rows.append(("not yet built", f"{names} (enabled in config, skipped)"))
        if s.proxy_addr:
            rows.append(("proxy", f"https://{s.proxy_addr}  (ward login --proxy={s.proxy_addr})"))
        if s.auth_addr:
            rows.append(("auth API", f"https://{s.auth_addr}"))
        if s.ssh_addr:
            rows.append(("ssh node", s.ssh_addr))
        if s.tunnel_to:
            rows.append(("ssh node", f"reverse tunnel to {s.tunnel_to}"))
        rows.append(("data dir", str(s.data_dir)))
        if s.ca_pin:
            rows.append(("CA pin", s.ca_pin))
        if s.admin_identity:
            rows.append(("admin identity", f"{s.admin_identity}  (wardctl finds it via --data-dir or -i)"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            console.print(f"  {k.ljust(width)}  {v}", markup=False)
        if s.first_start:
            dd = f" --data-dir {s.data_dir}" if str(s.data_dir) != "wardgate-data" else ""
            console.print("\nCreate the first user (it prints an invitation to register):")
            console.print(f"  wardctl{dd} users add alice --roles=editor,access --logins=root", markup=False)
        console.print("Press Ctrl-C to stop.")

    runtime.run(WardgateProcess(cfg).run_forever(started))


@main.command()
def configure() -> None:
    """Print a commented sample wardgate.yaml (redirect it to a file and edit)."""
    from wardgate.config import SAMPLE_CONFIG

    click.echo(SAMPLE_CONFIG.rstrip())


if __name__ == "__main__":
    main()
