#!/usr/bin/env python3
"""Sorts the disagreements the differential oracle kept into Spur's deliberate differences
from Prefect (docs/prefect-differences.md) and unexplained ones.

usage: oracle_known.py ORACLE_DIR SPUR_BINARY FOUND.json...
  (run with the python of the Prefect 3.8.8 virtualenv; scripts/oracle.sh calls it)

Prints one line per file, `known <kind>: FILE` or `UNEXPLAINED: FILE`, and exits 1 if any
file is unexplained. It wraps the oracle's own fuzz.py (nothing of it is copied here).

A disagreement is *known* only when it is explained by a deliberate difference, never by
its shape alone: each kind names the construct it is about, the scenario must contain that
construct, and the scenario with the construct taken out (`neutralise`) must agree with
Prefect again, with Prefect's firings recomputed. So a real difference that happens to sit
beside a deliberate one still fails the run.
"""
import copy
import json
import re
import sys

# `{{ event.resource.labels.<label> }}` and nothing else: Prefect wraps a parameter that is a
# single expression in `tojson`, which fails on the label object, so no run starts; Spur
# renders the label's value (docs/prefect-differences.md, "A parameter that is only a
# resource label").
SINGLE_LABEL = re.compile(r"^\s*\{\{\s*event\.resource\.labels\.[A-Za-z0-9_.-]+\s*\}\}\s*$")


def _strip_single_label_parameters(sc):
    out = copy.deepcopy(sc)
    changed = False
    for auto in out["automations"]:
        for action in auto.get("actions", []):
            params = action.get("parameters")
            if not isinstance(params, dict):
                continue
            for key in [k for k, v in params.items() if isinstance(v, str) and SINGLE_LABEL.match(v)]:
                del params[key]
                changed = True
    return out if changed else None


# kind -> function returning the scenario without the construct, or None when the scenario
# does not contain it.
KINDS = {
    "single-expression-label-parameter": _strip_single_label_parameters,
}


def explain(fuzz, sc):
    """The kind that explains the disagreement in `sc`, or None."""
    for kind, neutralise in KINDS.items():
        plain = neutralise(sc)
        if plain is None:
            continue
        if fuzz.disagreement(plain) is None:
            return kind
    return None


def main():
    oracle_dir, spur = sys.argv[1], sys.argv[2]
    sys.path.insert(0, oracle_dir)
    import fuzz  # noqa: E402  (the oracle's fuzz.py, unmodified)

    fuzz.SPUR = spur
    unexplained = 0
    for path in sys.argv[3:]:
        with open(path) as f:
            sc = json.load(f)
        sc = {k: sc[k] for k in ("name", "automations", "events", "until") if k in sc}
        kind = explain(fuzz, sc)
        if kind:
            print("known %s: %s" % (kind, path), flush=True)
        else:
            unexplained += 1
            print("UNEXPLAINED: %s" % path, flush=True)
    sys.exit(1 if unexplained else 0)


if __name__ == "__main__":
    main()
