#!/usr/bin/env bash
# Create .venv with the given Python. Debian's python3 ships without ensurepip: when venv
# cannot be created, install python3-venv with apt-get and try again.
set -euo pipefail
py="$1"
venv="$2"
[ -x "$venv/bin/python" ] && [ -x "$venv/bin/pip" ] && exit 0
rm -rf "$venv"
if "$py" -m venv "$venv" 2>/dev/null; then exit 0; fi
rm -rf "$venv"
echo "python venv support is missing: installing python3-venv with apt-get"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends python3-venv
"$py" -m venv "$venv"
