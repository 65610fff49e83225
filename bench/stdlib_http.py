"""bench/http.py shares its name with the standard library's `http` package, and Python puts a
script's folder first on sys.path. Every script here imports this module before anything that
could import `http` (aiohttp, urllib): it loads the standard library's package with this folder
left out, so `http` means the standard library from then on."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_saved = sys.path[:]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
try:
    import http.client
    import http.cookies
    import http.server  # noqa: F401 - imported for sys.modules
finally:
    sys.path[:] = _saved
