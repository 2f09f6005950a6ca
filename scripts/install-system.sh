#!/usr/bin/env bash
# The Debian packages the test suite needs beyond Python: chromium and chromedriver for the
# console's browser test (tests/test_console_browser.py; browser downloads are not possible, so it
# drives Debian's build), and postgresql, whose server the database tests start themselves
# (tests/pg.py; Debian keeps initdb in /usr/lib/postgresql/<version>/bin, off PATH), and
# docker-compose, whose `config` validates docker-compose.yml without a Docker daemon
# (tests/test_deploy_compose.py).
# Installs only what is missing, so a machine that has them runs no apt.
# Needs root (CI runs as root); anyone else gets a note and those tests skip.
set -euo pipefail

packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null ||
  packages+=(postgresql)
command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)

if [ "${#packages[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system: missing ${packages[*]} (needs root and apt-get); the browser, PostgreSQL and compose-validation tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# postgresql's post-install starts a cluster of its own where it can; the tests never use it.
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "install-system: installed ${packages[*]}"
