#!/usr/bin/env bash
# Runs every cargo-fuzz (libFuzzer) target in fuzz/ for a bounded time; fails on a crash.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     # default 60 s per target, every target
#
# Only a stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets stable rustc take the nightly
# flags cargo-fuzz passes (-Zsanitizer, -Cpasses=sancov-module). cargo-fuzz is installed
# into ~/.cargo from crates.io when missing.
#
# Seeds live in fuzz/corpus/<target>/ (kept small, in the repo). libFuzzer writes what it
# discovers into its first corpus folder, so each run works in fuzz/target/corpus/<target>/
# (kept between runs, never committed) and only reads the seeds.
#
# A crash leaves its input in fuzz/artifacts/<target>/; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none <target> fuzz/artifacts/<target>/<file>
# fix the bug, and add the input as a regression unit test beside the code.
#
# SPUR_FUZZ_SANITIZER=address turns AddressSanitizer on (Spur is safe Rust; the default,
# none, runs about twice as many inputs per second). SPUR_FUZZ_JOBS=N runs N processes
# per target.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-60}"
shift || true
sanitizer="${SPUR_FUZZ_SANITIZER:-none}"
jobs="${SPUR_FUZZ_JOBS:-1}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi

cd "$here/fuzz"
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "build: $(( $(date +%s) - start )) s"

failed=()
for target in "${targets[@]}"; do
  work="target/corpus/$target"
  mkdir -p "$work" "corpus/$target"
  log="target/fuzz-$target.log"
  echo "== $target: ${seconds} s"
  # -rss_limit_mb: a target that needs more than 2 GiB for one input is a bug (the daemon
  # must stay bounded). -timeout: one input taking 10 s is a hang.
  # With -jobs, libFuzzer runs children that log to fuzz-<n>.log; one job runs in place.
  parallel=()
  if [ "$jobs" -gt 1 ]; then
    parallel=(-jobs="$jobs" -workers="$jobs")
  fi
  if cargo fuzz run --sanitizer "$sanitizer" "$target" "$work" "corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
      "${parallel[@]}" -print_final_stats=1 >"$log" 2>&1; then
    grep -aE '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE' "$log" | sed "s/^/   /" || true
  else
    echo "   CRASH (see fuzz/$log and fuzz/artifacts/$target/)"
    tail -n 40 "$log" | sed "s/^/   /"
    failed+=("$target")
  fi
done

echo "total: $(( $(date +%s) - start )) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashed: ${failed[*]}"
  exit 1
fi
