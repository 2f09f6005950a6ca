#!/usr/bin/env bash
# The Debian packages the test suite needs beyond Python: chromium and chromedriver for the
# console's browser test (tests/test_console_browser.py; browser downloads are not possible, so it
# drives Debian's build). Installs only what is missing, so a machine that has them runs no apt.
# Needs root (CI runs as root); anyone else gets a note and the browser test skips.
set -euo pipefail

packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)

if [ "${#packages[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system: missing ${packages[*]} (needs root and apt-get); the browser tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "install-system: installed ${packages[*]}"
