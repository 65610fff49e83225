"""How the proxy logs in to a node as an SSH client (web terminal, agentless recording).

One set of options: only our key and certificate, only the cluster's host CA trusted for the
node's name, nothing from the environment (no agent, no config files, no passwords, no GSS).
"""

from __future__ import annotations

from typing import Any

import asyncssh


def node_client_options(
    *,
    login: str,
    key: asyncssh.SSHKey,
    cert: asyncssh.SSHCertificate,
    host_ca_keys: list[asyncssh.SSHKey],
    host_alias: str,
    connect_timeout: float,
    keepalive_interval: float,
    **extra: Any,
) -> asyncssh.SSHClientConnectionOptions:
    return asyncssh.SSHClientConnectionOptions(
        username=login,
        client_keys=[(key, cert)],
        known_hosts=([], host_ca_keys, []),
        host_key_alias=host_alias,
        agent_path=None,
        agent_forwarding=False,
        password=None,
        kbdint_auth=False,
        gss_host=None,
        x509_trusted_certs=None,
        x509_trusted_cert_paths=[],
        preferred_auth="publickey",
        connect_timeout=connect_timeout,
        keepalive_interval=keepalive_interval,
        encoding=None,
        config=None,
        **extra,
    )
