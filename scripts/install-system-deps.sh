#!/usr/bin/env bash
# Installs the Debian packages the test suite drives (real clients and servers), only if missing.
set -euo pipefail
need=()
# A fresh Debian/Ubuntu has python3 but not always venv/pip support.
python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
[ "${1:-}" = "--python-only" ] && pairs="" || pairs="ssh-keygen:openssh-client sshd:openssh-server chromium:chromium psql:postgresql-client mariadbd:mariadb-server mariadb:mariadb-client nginx:nginx-light redis-server:redis-server redis-cli:redis-tools curl:curl"
for pair in $pairs; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
# PostgreSQL's server binaries live outside PATH.
if [ "${1:-}" != "--python-only" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # Tests start their own throw-away servers: keep the packages' system daemons from starting.
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$guard" >/dev/null && $SUDO chmod +x "$guard"
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
    [ -z "$guard" ] || $SUDO rm -f "$guard"
fi
