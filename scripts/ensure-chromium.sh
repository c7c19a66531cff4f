#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium` package) renders the HTML pages we produce in the
# tests. Installs it when missing and we may (root with apt-get); otherwise says what to do.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian chromium (headless browser for the report tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "warning: no chromium; the report tests need it: sudo apt-get install chromium" >&2
fi
