#!/usr/bin/env bash
# Differential conformance: generated scenarios through Prefect 3.8.8's own trigger engine
# and through `spur replay`, compared (the oracle in ../shared/conformance/oracle/, README
# there). Fails on any disagreement the oracle keeps that is not one of Spur's deliberate
# differences (docs/prefect-differences.md, recognised by scripts/oracle_known.py), and
# prints each such disagreement (the minimised scenario, Prefect's firings as `expect`, and
# what Spur printed), so a red run says what differs.
#
#   scripts/oracle.sh                       # the fixed seeds, with the generator switches on
#   scripts/oracle.sh SEED COUNT [SWITCHES] # COUNT scenarios from SEED (`just fuzz SEED COUNT`)
#
# The scenarios come from scripts/oracle_gen.py: the oracle's fuzz.py with its generator
# widened by switches (roles, match-related, long, templates; `all`; `none` is fuzz.py's own
# generator). SWITCHES is a comma-separated list, default SPUR_ORACLE_WITH or `none`.
# With SPUR_ORACLE_JOBS=N (default 2) the work runs as N parallel processes; a run of
# SEED COUNT is then split into the seeds SEED.0 … SEED.N-1 of COUNT/N scenarios each (every
# scenario is still reproducible: `oracle_gen.py SEED.k COUNT --with=SWITCHES`). Outputs
# (logs, found/) go to target/oracle/<seed>/, emptied first.
#
# Needs: the Prefect virtualenv scripts/provision.sh makes (or SPUR_PREFECT_PYTHON), a built
# `spur` (SPUR_BIN, else the newer of target/release/spur and target/debug/spur), and the
# oracle (SPUR_ORACLE_DIR, default ../shared/conformance/oracle). Without the oracle or the
# virtualenv it reports itself skipped, or fails under SPUR_REQUIRE_TEST_TOOLS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

oracle_dir="${SPUR_ORACLE_DIR:-../shared/conformance/oracle}"
python="${SPUR_PREFECT_PYTHON:-target/test-tools/prefect/bin/python}"
jobs="${SPUR_ORACLE_JOBS:-2}"

skip() {
  if [ "${SPUR_REQUIRE_TEST_TOOLS:-0}" = "1" ]; then
    echo "oracle: $*" >&2
    exit 1
  fi
  echo "oracle: skipped: $*"
  exit 0
}
[ -f "$oracle_dir/fuzz.py" ] || skip "no oracle at $oracle_dir"
[ -x "$python" ] || skip "no Prefect virtualenv ($python; run scripts/provision.sh)"
"$python" -c "import prefect, fastapi; assert prefect.__version__ == '3.8.8', prefect.__version__" \
  || skip "$python lacks prefect 3.8.8 and fastapi"

spur="${SPUR_BIN:-}"
if [ -z "$spur" ]; then
  for candidate in target/release/spur target/debug/spur; do
    if [ -x "$candidate" ] && { [ -z "$spur" ] || [ "$candidate" -nt "$spur" ]; }; then
      spur="$candidate"
    fi
  done
fi
[ -n "$spur" ] && [ -x "$spur" ] || { echo "oracle: no spur binary (cargo build --release -p spur)" >&2; exit 1; }
spur="$(cd "$(dirname "$spur")" && pwd)/$(basename "$spur")"

# Seed, scenario count and generator switches per process (SEED:COUNT:SWITCHES).
shards=()
if [ $# -ge 2 ] && [ $# -le 3 ]; then
  with="${3:-${SPUR_ORACLE_WITH:-none}}"
  per=$(( ($2 + jobs - 1) / jobs ))
  if [ "$jobs" -le 1 ]; then
    shards=("$1:$2:$with")
  else
    for ((k = 0; k < jobs; k++)); do shards+=("$1.$k:$per:$with"); done
  fi
elif [ $# -eq 0 ]; then
  # Fixed seeds for CI: fuzz.py's own generator, then the switches, alone and together
  # (`long` with everything else). About two minutes with the default two processes.
  shards=(ci-1:60:none ci-2:60:roles ci-3:60:match-related,roles ci-4:4:long,roles,match-related,templates
    ci-5:60:templates ci-6:40:templates,roles,match-related)
else
  echo "usage: scripts/oracle.sh [SEED COUNT [SWITCHES]]" >&2
  exit 2
fi

echo "oracle: $spur against Prefect $("$python" -c 'import prefect; print(prefect.__version__)') (${#shards[@]} seeds, $jobs at a time)"
start=$(date +%s)
out_root=target/oracle
mkdir -p "$out_root"
run_shard() {
  local seed count with out
  IFS=: read -r seed count with <<<"$1"
  out="$out_root/$seed"
  rm -rf "$out"
  mkdir -p "$out"
  if SPUR_BIN="$spur" SPUR_ORACLE_DIR="$oracle_dir" "$python" scripts/oracle_gen.py "$seed" "$count" \
    --with="$with" --spur "$spur" --out "$out" >"$out/stdout.txt" 2>"$out/stderr.txt"; then
    echo 0 >"$out/rc"
  else
    echo $? >"$out/rc"
  fi
}
running=0
for shard in "${shards[@]}"; do
  run_shard "$shard" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

failed=0
found=()
printf '%-12s %-34s %6s %6s %9s %6s %12s\n' seed switches run agree ambiguous kept oracle-error
for shard in "${shards[@]}"; do
  IFS=: read -r seed _ with <<<"$shard"
  out="$out_root/$seed"
  summary="$(grep '^SUMMARY ' "$out/stdout.txt" | tail -1 | cut -d' ' -f2- || true)"
  if [ "$(cat "$out/rc" 2>/dev/null || echo 1)" != "0" ] || [ -z "$summary" ]; then
    echo "$seed: fuzz.py failed (exit $(cat "$out/rc" 2>/dev/null || echo '?')):"
    tail -20 "$out/stderr.txt" "$out/stdout.txt"
    failed=1
    continue
  fi
  "$python" -c 'import json,sys; s=json.loads(sys.argv[3]); print("%-12s %-34s %6d %6d %9d %6d %12d" % (sys.argv[1], sys.argv[2], s["run"], s["agree"], s["ambiguous"], s["kept"], s["oracle_error"]))' "$seed" "$with" "$summary"
  if [ -d "$out/found" ]; then
    while IFS= read -r f; do found+=("$f"); done < <(find "$out/found" -name '*.json' | sort)
  fi
  grep -h '"result": "oracle-error"' "$out"/fuzz-log-*.jsonl 2>/dev/null | head -3 | sed 's/^/  oracle error: /' || true
done

if [ "${#found[@]}" -gt 0 ]; then
  echo
  echo "oracle: ${#found[@]} kept disagreement(s); checking them against the deliberate differences"
  verdicts="$("$python" scripts/oracle_known.py "$oracle_dir" "$spur" "${found[@]}" || true)"
  echo "$verdicts"
  while IFS= read -r line; do
    case "$line" in
      UNEXPLAINED:*)
        failed=1
        file="${line#UNEXPLAINED: }"
        echo
        echo "==> $file"
        cat "$file"
        ;;
    esac
  done <<<"$verdicts"
  if [ -z "$verdicts" ]; then
    echo "oracle: the known-difference check failed" >&2
    failed=1
  fi
fi

echo
echo "oracle: $(($(date +%s) - start)) s; outputs in $out_root/"
if [ "$failed" != "0" ]; then
  echo "oracle: FAILED: Spur and Prefect disagree (above), or the oracle did not run" >&2
  exit 1
fi
echo "oracle: no unexplained disagreement"
