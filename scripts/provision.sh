#!/usr/bin/env bash
# Installs what Spur's tests need and a fresh machine lacks. Sourced by scripts/test.sh, so
# the exports below reach the tests. Idempotent: a second run only checks.
set -euo pipefail

# The Rust toolchain's lint and format components.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi
