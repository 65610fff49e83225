"""The reverse-tunnel wire contract, shared by the proxy (`proxy/tunnel.py`) and agents
(`agent/tunnel.py`): ALPN, SSH algorithms and window sizes, keep-alive arithmetic, and how the
client's address travels in a channel open."""

from __future__ import annotations

from wardgate.errors import BadParameterError

TUNNEL_ALPN = "ward-tunnel"
CHANNEL_WINDOW = 8 * 1024 * 1024
"""Per-channel receive window: one loopback-to-WAN bandwidth-delay product of headroom."""
CHANNEL_MAX_PKTSIZE = 256 * 1024
"""Per-channel max packet: asyncssh's per-packet Python cost dominates, so fewer, larger packets."""
ENCRYPTION_ALGS: tuple[str, ...] = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
"""Measured fastest in asyncssh (AES-NI); the TLS layer already protects the link."""
MAC_ALGS: tuple[str, ...] = ("hmac-sha2-256-etm@openssh.com",)
"""Unused with the AEAD ciphers above, but asyncssh needs one to offer."""
COMPRESSION_ALGS = None
"""Compression off: it costs CPU per byte and tunnelled payloads are mostly encrypted already."""


def asyncssh_keepalive(interval: float, count_max: int) -> dict[str, float | int]:
    """asyncssh's keep-alive options for "a peer silent for `interval * count_max` seconds is dead".

    asyncssh sends a keep-alive after each silent interval and gives up once more than
    `count_max` went unanswered, i.e. after `count_max + 1` intervals; so its interval is
    scaled down to make the total come out right.
    """
    if interval <= 0 or count_max <= 0:
        return {"keepalive_interval": 0, "keepalive_count_max": 0}
    return {"keepalive_interval": interval * count_max / (count_max + 1), "keepalive_count_max": count_max}


def format_client_addr(host: str, port: int) -> str:
    """`1.2.3.4:5678` or `[::1]:5678`; empty when the proxy sent no address."""
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_client_addr(addr: str) -> tuple[str, int]:
    """The inverse of `format_client_addr`; a bare host gets port 0, an empty string ("", 0)."""
    if not addr:
        return "", 0
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif addr.count(":") == 1:
        host, _, port = addr.partition(":")
    else:
        host, port = addr, ""
    try:
        return host, int(port) if port else 0
    except ValueError:
        raise BadParameterError(f"bad client address {addr!r}: expected host:port") from None
