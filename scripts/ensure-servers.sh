#!/usr/bin/env bash
# Make sure PostgreSQL and Redis *server binaries* exist for the integration tests, and
# systemd-analyze for the check of deploy/marketflow.service (it verifies the unit file
# offline: no running systemd needed), and Prometheus (promtool tests the alerting rules; the
# prometheus binary scrapes a live daemon in tests/e2e/test_prometheus_e2e.py). The tests start
# their own throwaway servers on free ports; nothing here starts a service.
set -euo pipefail

have_pg() {
  command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_redis() { command -v redis-server >/dev/null 2>&1; }
have_systemd_analyze() { command -v systemd-analyze >/dev/null 2>&1; }
have_prometheus() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

missing=()
have_pg || missing+=(postgresql)
have_redis || missing+=(redis-server)
have_systemd_analyze || missing+=(systemd)
have_prometheus || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing ${missing[*]} with apt-get (binaries the integration and deploy tests use)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
