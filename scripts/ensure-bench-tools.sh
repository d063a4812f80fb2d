#!/usr/bin/env bash
# Make sure the load generator bench.api drives the HTTP API with exists: wrk (a Debian
# package). Nothing here starts a service.
set -euo pipefail

command -v wrk >/dev/null 2>&1 && exit 0

echo "installing wrk with apt-get (the HTTP load generator bench.api runs)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq --no-install-recommends wrk; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends wrk
fi
