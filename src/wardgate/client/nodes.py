"""`ward ls`: the nodes the caller may see (asked of the auth API through the proxy), filtered here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wardgate.client.profile import Profile
from wardgate.client.proxyclient import ProxyClient
from wardgate.errors import BadParameterError


@dataclass(frozen=True)
class Selector:
    """`env=prod,role=web`: every label must be present with exactly that value."""

    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str]) -> Selector:
        pairs: list[tuple[str, str]] = []
        for item in items:
            for part in item.split(","):
                if not part.strip():
                    continue
                key, eq, value = part.partition("=")
                if not eq or not key.strip():
                    raise BadParameterError(f"bad label filter {part!r}: expected label=value")
                pairs.append((key.strip(), value.strip()))
        return cls(tuple(pairs))

    def matches(self, node: Mapping[str, Any]) -> bool:
        labels = node.get("labels") or {}
        return all(k in labels and str(labels[k]) == v for k, v in self.labels)

    def __bool__(self) -> bool:
        return bool(self.labels)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels)


def is_selector(target: str) -> bool:
    """`ward ssh env=prod …` targets labels; node names and `login@node` never contain `=`."""
    return "=" in target


async def visible_nodes(profile: Profile) -> list[dict[str, Any]]:
    async with ProxyClient.for_profile(profile) as c:
        return await c.visible_nodes()


def filter_nodes(nodes: Sequence[dict[str, Any]], selector: Selector) -> list[dict[str, Any]]:
    return sorted((n for n in nodes if selector.matches(n)), key=lambda n: str(n.get("name", "")))


def node_rows(nodes: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Node | Address | Labels | Logins, as `ward ls` prints them."""
    rows = []
    for n in nodes:
        labels = n.get("labels") or {}
        addr = "⟵ tunnel" if n.get("tunnel") else str(n.get("addr") or "")
        rows.append(
            [
                str(n.get("name", "")),
                addr,
                ",".join(f"{k}={labels[k]}" for k in sorted(labels)),
                ", ".join(str(x) for x in n.get("logins") or []),
            ]
        )
    return rows
