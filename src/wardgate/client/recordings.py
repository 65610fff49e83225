"""`ward play`: fetch a session recording through the proxy and replay or export it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from wardgate.client.profile import Profile
from wardgate.client.proxyclient import ProxyClient


async def fetch_recording(profile: Profile, sid: str, dest_dir: str | None = None) -> Path:
    """Download `<sid>.cast.gz` into a private temp dir (or dest_dir) and return its path."""
    async with ProxyClient.for_profile(profile) as c:
        data = await c.get_recording(sid)
    directory = Path(dest_dir or tempfile.mkdtemp(prefix="ward-play-"))
    path = directory / f"{sid}.cast.gz"
    path.write_bytes(data)
    return path
