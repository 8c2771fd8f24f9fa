# Everyday recipes. `just --list` shows them all.

# Run the daemon on embedded defaults (no NATS needed).
run *ARGS:
    cargo run --release -- serve {{ARGS}}

# The whole suite, exactly as CI runs it (provisions what the tests need).
test:
    ./scripts/test.sh

# Fast loop: tests only, no lints.
quick:
    SPUR_SKIP_LINT=1 ./scripts/test.sh

# Format and lint.
lint:
    cargo fmt --all
    cargo clippy --workspace --all-targets -- -D warnings

# Benchmarks (see docs/benchmarks.md for the figures and how to read them).
bench:
    cargo bench -p spur-matcher --bench matcher
    cargo bench -p spur-matcher --bench memory

# Validate the shipped automations.
check PATH="config/automations":
    cargo run --release -- check {{PATH}}

# Run the trigger scenarios and the public conformance examples.
scenarios:
    cargo run --release -- test tests/scenarios ../shared/conformance/examples

# Fuzz every cargo-fuzz target for SECONDS each (libFuzzer; see docs/fuzzing.md).
fuzz-targets SECONDS="60":
    ./scripts/fuzz.sh {{SECONDS}}

# Differential fuzzing against Prefect 3.8.8's own trigger engine: COUNT generated scenarios
# from SEED (split over SPUR_ORACLE_JOBS processes), failing on any unexplained disagreement.
# SWITCHES widens the generator (roles, match-related, long, templates, all; scripts/oracle_gen.py).
# Without arguments, scripts/oracle.sh runs CI's fixed seeds. See docs/prefect-differences.md.
fuzz SEED COUNT SWITCHES="none":
    cargo build --release -p spur
    SPUR_BIN=target/release/spur ./scripts/oracle.sh {{SEED}} {{COUNT}} {{SWITCHES}}

# Issue 23's end-to-end figures: load, memory, ingest, listing, reload and checkpoint at
# 1 000 / 10 000 / 100 000 automations (docs/benchmarks.md).
bench-automations COUNTS="1000,10000,100000":
    cargo build --release -p spur
    python3 scripts/bench_automations.py --counts {{COUNTS}}

# Issue 14's side-by-side figures: Prefect's automations evaluated by Prefect, then by Spur
# beside the same kind of server (docs/benchmarks.md, "Beside a Prefect server").
bench-prefect-bridge:
    cargo build --release -p spur
    python3 scripts/bench_prefect_bridge.py
