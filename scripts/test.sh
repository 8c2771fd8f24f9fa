#!/usr/bin/env bash
# Runs Spur's whole test suite on a fresh machine: provisions what the tests need, checks
# formatting and lints, runs every crate's unit, property and end-to-end tests, then the
# trigger scenario suite and the public conformance examples through the real binary.
#
#   ./scripts/test.sh            # everything
#   SPUR_SKIP_LINT=1 ./scripts/test.sh   # tests only
#   SPUR_SKIP_FUZZ=1 ./scripts/test.sh   # without the fuzz targets (about 13 minutes cold)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "provisioning"
# shellcheck source=scripts/provision.sh
source scripts/provision.sh
# Everything the tests need is provisioned now: a test that would skip for a missing tool
# (nats-server, the Prefect client, Chromium) fails instead of passing without running.
export SPUR_REQUIRE_TEST_TOOLS=1

if [ "${SPUR_SKIP_LINT:-0}" != "1" ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy -D warnings"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

step "cargo build --release (the binary the load-heavy end-to-end tests start)"
cargo build --release --locked -p spur
# Daemons in end-to-end tests run from the release build (tests/support: spur_bin), so the
# cluster chaos test's 30 000 events measure Spur, not unoptimised code.
export SPUR_TEST_BIN="$PWD/target/release/spur"

step "cargo test (unit, property and end-to-end tests)"
cargo test --workspace --locked

step "spur test: trigger scenarios and public conformance examples"
suites=(tests/scenarios)
if [ -d ../shared/conformance/examples ]; then
  suites+=(../shared/conformance/examples)
fi
./target/release/spur test "${suites[@]}"

step "differential oracle: Prefect 3.8.8's engine beside spur replay (fixed seeds)"
SPUR_BIN=./target/release/spur ./scripts/oracle.sh

if [ "${SPUR_SKIP_FUZZ:-0}" != "1" ]; then
  step "fuzz targets: event parser, automation loader, templates, webhook mapping (60 s each)"
  ./scripts/fuzz.sh 60
fi
