#!/usr/bin/env python3
"""The differential oracle's fuzzer with Spur's wider generator switches.

usage: oracle_gen.py SEED COUNT [--with=SWITCH,...] [fuzz.py's options: --spur BINARY --out DIR --no-minimise]
       oracle_gen.py --print SEED COUNT [--with=...]   (print the scenarios, one JSON per line)
  (run it with the python of the Prefect 3.8.8 virtualenv; SPUR_ORACLE_DIR names the oracle,
  default ../shared/conformance/oracle; scripts/oracle.sh calls it)

It runs the oracle's own fuzz.py (generation, Prefect's firings, `spur replay`, the
variant check, minimising, saving: nothing of it is copied here) with its generator,
gen.py's `Gen`, widened by the switches below. Without --with it is exactly fuzz.py.
Every switch that is on applies to every scenario, and the scenarios of a seed depend on
the seed and on the set of switches, so `oracle_gen.py SEED COUNT --with=S` reproduces a run.

Switches:
  roles           for_each over related labels of several roles: more related resources per
                  role (Prefect takes the first of a role), for_each on `related:<role>:<label>`
                  for each role and label, several such keys at once, and `labels[...]` of
                  them in the parameters.
  match-related   match_related as a list of 2-3 filters (roles, ids, wildcards, negations,
                  value lists), every trigger.
  long            long streams: 100-250 events (still inside 10 minutes, so no 15 min
                  lost-follower release nor 30 min seen-id expiry) and 3-7 automations.
  templates       run-deployment parameters from a table of templates: default, tojson, upper,
                  replace, length, int, %-formatting and format(), string/number joins,
                  undefined attributes, nested __prefect_kind values, whitespace, if/for; and
                  payloads with floats, booleans, nulls, lists, objects, numeric strings.
  all             every switch above.
"""
import json
import os
import sys
from datetime import timedelta

ORACLE_DIR = os.environ.get(
    "SPUR_ORACLE_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "conformance", "oracle"),
)
sys.path.insert(0, os.path.abspath(ORACLE_DIR))

SWITCHES = ("roles", "match-related", "long", "templates")

# --------------------------------------------------------------------- roles
# Several related resources per role, with labels beyond `team`, so that the first one of a
# role (what Prefect's `related:<role>:<label>` takes) is a real choice.
RELATED_WIDE = {
    "rel.owner.1": ("owner", {"team": "red", "tier": "1"}),
    "rel.owner.2": ("owner", {"team": "blue", "tier": "2"}),
    "rel.owner.3": ("owner", {"team": "red"}),
    "rel.tag.1": ("tag", {"team": "red", "tier": "1"}),
    "rel.tag.2": ("tag", {"team": "green"}),
    "rel.flow.1": ("flow", {"team": "green", "tier": "2"}),
    "rel.flow.2": ("flow", {"team": "blue"}),
    "rel.run.1": ("flow-run", {"team": "blue", "tier": "1"}),
}
ROLES_WIDE = ["owner", "tag", "flow", "flow-run"]
FOR_EACH_RELATED = [
    "related:%s:%s" % (role, label)
    for role in ROLES_WIDE + ["absent"]
    for label in ("team", "tier", "prefect.resource.id")
]

# --------------------------------------------------------------------- templates
# (key, value) pairs; the values are what users write in Prefect's run-deployment
# parameters. Payload fields (templates switch): n int, s str, f float, b bool, z null,
# l list, d object, ns numeric string, ws padded string, name mixed case.
TEMPLATES = [
    # default
    ("def_missing", "{{ event.payload.missing | default('d') }}"),
    ("def_null", "{{ event.payload.z | default('d') }}"),
    ("def_null_bool", "{{ event.payload.z | default('d', true) }}"),
    ("def_empty_bool", "{{ event.payload.empty | default('e', true) }}"),
    ("def_num", "{{ event.payload.missing | default(3) }}"),
    ("def_text", "x={{ event.payload.missing | default('none') }}"),
    ("def_nested", "{{ event.payload.d.zz | default(0) }}"),
    # tojson
    ("tj_obj", "{{ event.payload.d | tojson }}"),
    ("tj_list_text", "l={{ event.payload.l | tojson }}"),
    ("tj_str", "{{ event.payload.s | tojson }}"),
    ("tj_payload", "p={{ event.payload | tojson }}"),
    ("tj_num", "{{ event.payload.n | tojson }}"),
    # upper / lower / replace / trim
    ("up_s", "{{ event.payload.s | upper }}"),
    ("up_event", "{{ event.event | upper }}"),
    ("low_name", "{{ event.payload.name | lower }}"),
    ("repl_rid", "{{ event.resource.id | replace('.', '-') }}"),
    ("repl_text", "r={{ event.event | replace('job', 'task') }}"),
    ("trim_ws", "{{ event.payload.ws | trim }}"),
    # length
    ("len_list", "{{ event.payload.l | length }}"),
    ("len_str", "{{ event.payload.s | length }}"),
    ("len_obj", "{{ event.payload.d | length }}"),
    ("len_text", "n={{ event.payload.l | length }}"),
    ("len_related", "{{ event.related | length }}"),
    # int / float
    ("int_ns", "{{ event.payload.ns | int }}"),
    ("int_plus", "{{ event.payload.ns | int + 1 }}"),
    ("int_f", "{{ event.payload.f | int }}"),
    ("int_n", "{{ event.payload.n | int }}"),
    ("float_n", "{{ event.payload.n | float }}"),
    # string and number formatting
    ("fmt_pad", "{{ '%05d' | format(event.payload.n) }}"),
    ("fmt_f2", "{{ '%.2f' | format(event.payload.f) }}"),
    ("fmt_two", "{{ '%s-%s' | format(event.payload.s, event.payload.n) }}"),
    ("cat", "{{ event.payload.n ~ '/' ~ event.payload.s }}"),
    ("round1", "{{ event.payload.f | round(1) }}"),
    ("f_text", "f={{ event.payload.f }}"),
    ("f_whole", "{{ event.payload.f }}"),
    ("div", "{{ event.payload.n / 2 }}"),
    ("floordiv", "{{ event.payload.n // 2 }}"),
    ("mul_text", "x={{ event.payload.n * 1.5 }}"),
    ("b_whole", "{{ event.payload.b }}"),
    ("b_text", "b={{ event.payload.b }}"),
    ("z_whole", "{{ event.payload.z }}"),
    ("z_text", "z={{ event.payload.z }}"),
    ("l_text", "l={{ event.payload.l }}"),
    ("d_whole", "{{ event.payload.d }}"),
    ("string_n", "{{ event.payload.n | string }}"),
    ("join_l", "{{ event.payload.l | join(',') }}"),
    ("first_l", "{{ event.payload.l | first }}"),
    ("sum_l", "{{ event.payload.l | sum }}"),
    # undefined attributes
    ("undef_whole", "{{ event.payload.missing }}"),
    ("undef_text", "u={{ event.payload.missing }}!"),
    ("undef_deep", "{{ event.payload.d.missing }}"),
    ("undef_label", "k={{ event.resource.labels.nope }}"),
    ("undef_is", "{{ event.payload.missing is defined }}"),
    # resource helpers
    ("rid_name", "{{ event.resource.id }}/{{ event.resource.labels.env }}"),
    ("role_first", "{{ event.resource_in_role['owner'].id if 'owner' in event.resource_in_role else 'none' }}"),
    # whitespace
    ("ws_outer", "  {{ event.payload.n }}  "),
    ("ws_tight", "{{event.payload.n}}"),
    ("ws_strip", "<{{- event.payload.s -}}>"),
    ("ws_lines", "a\n{{ event.payload.s }}\n"),
    ("ws_two", "{{ event.payload.n }} {{ event.payload.s }}"),
    ("ws_payload", "{{ event.payload.ws }}"),
    # control structures
    ("if", "{% if event.payload.n > 4 %}big{% else %}small{% endif %}"),
    ("for", "{% for x in event.payload.l %}{{ x }};{% endfor %}"),
    ("ternary", "{{ 'yes' if event.payload.b else 'no' }}"),
    # nested __prefect_kind values
    ("k_jinja_filter", {"__prefect_kind": "jinja", "template": "{{ event.payload.s | upper }}"}),
    ("k_jinja_ws", {"__prefect_kind": "jinja", "template": "  {{ event.payload.n }}  "}),
    ("k_jinja_num", {"__prefect_kind": "jinja", "template": "{{ event.payload.n + 1 }}"}),
    ("k_json_list", {"__prefect_kind": "json", "value": "[1, 2.5, \"x\", null]"}),
    ("k_nested", {"outer": {"__prefect_kind": "jinja", "template": "{{ event.event }}"}, "n": "{{ event.payload.n }}"}),
    ("k_in_list", [{"__prefect_kind": "json", "value": "{\"a\": true}"}, "{{ event.payload.s }}"]),
    ("k_none", {"__prefect_kind": "none", "value": "{{ event.payload.n }}"}),
    ("k_unknown", {"__prefect_kind": "whatever", "x": 1}),
]


def _event_payload(r):
    p = {}
    if r.random() < 0.95:
        p["n"] = r.randint(0, 9)
    if r.random() < 0.95:
        p["s"] = r.choice(["x", "y", "hello", "Hello World", "a.b-c", ""])
    p["f"] = r.choice([0.5, 1.5, 2.0, 3.25, 10.0, 0.1, 7.75])
    p["b"] = r.random() < 0.5
    if r.random() < 0.8:
        p["z"] = None
    p["l"] = [r.randint(0, 5) for _ in range(r.randint(0, 4))]
    p["d"] = {"a": r.randint(0, 3), "b": r.choice(["q", "r"])}
    if r.random() < 0.3:
        p["d"]["c"] = [1, 2]
    p["ns"] = r.choice(["42", "7", "0", "-3"])
    p["ws"] = r.choice([" padded ", "  two  ", "none"])
    p["name"] = r.choice(["MixedCase", "lower", "UPPER"])
    p["empty"] = r.choice(["", [], {}, 0])
    return p


def widened(base_gen, switches):
    Base = base_gen.Gen

    class Wide(Base):
        def __init__(self, seed):
            super().__init__(seed)
            r = self.r
            if "roles" in switches:
                base_gen.RELATED.update(RELATED_WIDE)
                if self.tight:
                    self.related = r.sample(list(RELATED_WIDE), k=r.randint(3, 5))
                else:
                    self.related = list(RELATED_WIDE)

        def related_spec(self):
            if "roles" not in switches and "match-related" not in switches:
                return super().related_spec()
            r = self.r
            s = {}
            roles = ROLES_WIDE if "roles" in switches else base_gen.ROLES
            rel_ids = list(RELATED_WIDE) if "roles" in switches else list(base_gen.RELATED)
            if r.random() < 0.75:
                x = r.random()
                if x < 0.7:
                    s["prefect.resource.role"] = r.choice(roles)
                elif x < 0.85:
                    s["prefect.resource.role"] = r.sample(roles, k=2)
                else:
                    s["prefect.resource.role"] = "!" + r.choice(roles)
            if r.random() < 0.5:
                x = r.random()
                if x < 0.5:
                    s["team"] = r.choice(["red", "blue", "green"])
                elif x < 0.7:
                    s["team"] = "!" + r.choice(["red", "blue"])
                else:
                    s["team"] = r.sample(["red", "blue", "green"], k=2)
            if "roles" in switches and r.random() < 0.25:
                s["tier"] = r.choice(["1", "2", ["1", "2"], "!1"])
            if r.random() < 0.35:
                s["prefect.resource.id"] = r.choice(
                    rel_ids + ["rel.owner.*", "rel.*", "!rel.tag.1", ["rel.flow.1", "rel.owner.2"]]
                )
            return s

        def match_related(self):
            if "match-related" not in switches:
                return super().match_related()
            r = self.r
            out = []
            for _ in range(r.choice([1, 2, 2, 2, 3])):
                spec = self.related_spec()
                # one or two constraints per filter, or a list of several rarely matches
                keys = list(spec)
                r.shuffle(keys)
                out.append({k: spec[k] for k in keys[: r.choice([1, 1, 2])]})
            return out

        def for_each(self):
            if "roles" not in switches:
                return super().for_each()
            r = self.r
            x = r.random()
            if x < 0.2:
                return []
            k = r.choice([1, 1, 2, 2, 3])
            keys = r.sample(FOR_EACH_RELATED, k=k)
            if r.random() < 0.3:
                keys.append(r.choice(["prefect.resource.id", "kind", "env"]))
            return keys

        def parameters(self, trigger):
            if "templates" not in switches:
                return super().parameters(trigger)
            r = self.r
            p = {}
            for key, tmpl in r.sample(TEMPLATES, k=r.randint(1, 4)):
                p[key] = tmpl
            for label in trigger.get("for_each") or []:
                if r.random() < 0.5:
                    p["lbl_" + label] = r.choice(
                        ["{{ labels['%s'] }}" % label, "v={{ labels['%s'] }}" % label,
                         "{{ labels['%s'] | upper }}" % label]
                    )
            return p

        def automation(self, i):
            auto = super().automation(i)
            if "roles" in switches and "templates" not in switches:
                fe = _for_each_of(auto["trigger"])
                if fe and self.r.random() < 0.5:
                    label = self.r.choice(fe)
                    auto["actions"][0]["parameters"]["lbl_" + label] = "{{ labels['%s'] }}" % label
            return auto

        def event(self, t):
            ev = super().event(t)
            r = self.r
            if "roles" in switches:
                # sometimes several related resources of one role, in random order
                if r.random() < 0.4:
                    pool = list(self.related)
                    extra = r.sample(pool, k=min(len(pool), r.randint(1, 3)))
                    have = {d["prefect.resource.id"] for d in ev["related"]}
                    for rel in extra:
                        if rel in have:
                            continue
                        role, labels = RELATED_WIDE.get(rel) or base_gen.RELATED[rel]
                        d = {"prefect.resource.id": rel, "prefect.resource.role": role}
                        d.update(labels)
                        ev["related"].append(d)
                    r.shuffle(ev["related"])
            if "templates" in switches:
                ev["payload"] = _event_payload(r)
            return ev

        def events(self):
            if "long" not in switches:
                return super().events()
            # the base stream's shape, longer: keep the knobs of Gen.events by running it
            # several times back to back and shifting each part after the previous one
            r = self.r
            target = r.randint(100, 250)
            evs, until = super().events()
            while len(evs) < target:
                more, more_until = super().events()
                last = max(base_gen_time(e["occurred"]) for e in evs)
                first = min(base_gen_time(e["occurred"]) for e in more)
                shift = last - first + timedelta(milliseconds=r.randint(50, 3000))
                for e in more:
                    e["occurred"] = base_gen.iso(base_gen_time(e["occurred"]) + shift)
                until = base_gen_time(more_until) + shift
                evs.extend(more)
            # stay inside 10 minutes of the first event (no 15 min lost-follower release,
            # no 30 min seen-id expiry): squeeze the times if needed
            t0 = base_gen_time(evs[0]["occurred"])
            tmax = max(base_gen_time(e["occurred"]) for e in evs)
            span = (max(tmax, until) - t0).total_seconds()
            if span > 600:
                # to a random span just under 10 min, so that `until` stays off the
                # proactive deadlines (S + k*within)
                k = (590.0 + r.randint(1, 8999) / 1000.0) / span
                for e in evs:
                    dt = (base_gen_time(e["occurred"]) - t0).total_seconds()
                    e["occurred"] = base_gen.iso(t0 + timedelta(milliseconds=int(dt * k * 1000)))
                until = t0 + timedelta(milliseconds=int((until - t0).total_seconds() * k * 1000))
            return evs, until

        def scenario(self, index):
            sc = super().scenario(index)
            if "long" in switches:
                extra = [self.automation(len(sc["automations"]) + i + 1) for i in range(self.r.randint(2, 4))]
                sc["automations"] = sc["automations"] + extra
            return sc

    return Wide


def _for_each_of(trigger):
    if trigger["type"] == "event":
        return list(trigger.get("for_each") or [])
    out = []
    for t in trigger["triggers"]:
        out.extend(_for_each_of(t))
    return out


def base_gen_time(s):
    from datetime import datetime, timezone

    if not isinstance(s, str):
        return s
    return datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(timezone.utc)


def parse_switches(argv):
    on = []
    rest = []
    for a in argv:
        if a.startswith("--with="):
            for s in a[len("--with="):].split(","):
                s = s.strip()
                if not s or s == "none":
                    continue
                if s == "all":
                    on.extend(SWITCHES)
                elif s in SWITCHES:
                    on.append(s)
                else:
                    sys.exit("oracle_gen.py: unknown switch %r (known: %s, all)" % (s, ", ".join(SWITCHES)))
        else:
            rest.append(a)
    return tuple(s for s in SWITCHES if s in on), rest


def install(switches):
    """Point fuzz.py's generator at the widened one; returns the fuzz module."""
    import fuzz  # noqa: E402  (the oracle's fuzz.py, unmodified)
    import gen as base_gen  # noqa: E402

    if switches:
        Wide = widened(base_gen, set(switches))
        tag = "+".join(switches)

        def scenario(seed, index):
            sc = Wide("%s/%d/%s" % (seed, index, tag)).scenario(index)
            sc["name"] += " with " + tag
            return sc

        base_gen.scenario = scenario
        fuzz.gen = base_gen
    return fuzz


def settle(fuzz):
    """Wraps fuzz.disagreement so that a scenario whose outcome depends on Prefect's scheduling
    (a long stream with several automations nearly always has one such automation) is not
    thrown away whole: for the scenario fuzz.py's loop is looking at (not the minimiser's
    candidates), when Spur disagrees and the variants do not agree, the automations whose own
    firings differ between the variants are taken out (each automation is evaluated on its
    own in Prefect, so that leaves the others' firings unchanged), in place, and the rest is
    compared again. fuzz.py then checks the variants and minimises as usual."""
    original = fuzz.disagreement
    current = {}

    def per_automation(firings):
        out = {}
        for f in firings:
            out.setdefault(f["automation"], []).append(f)
        return out

    def disagreement(sc):
        d = original(sc)
        if current.get("sc") is not sc or d is None or d[0] == "oracle-error" or len(sc["automations"]) < 2:
            return d
        current.pop("sc")
        _, firings, meta, _ = d
        ok, _ = fuzz.variants_agree(sc, firings, meta)
        if ok:
            return d
        exact = per_automation(firings)
        unsettled = set()
        for variant, tol in (("event-first", 0), ("deadline", 0), ("sweep", 0), ("dense1", 0), ("grid5", 5)):
            try:
                other, m = fuzz.oracle.run_scenario(sc, variant)
            except Exception:
                return d
            if m.get("ties") or meta.get("ties"):
                return d  # a sequence tie: leave it to fuzz.py (ambiguous)
            other = per_automation(other)
            for a in sc["automations"]:
                n = a["name"]
                if not fuzz.same_firings(exact.get(n, []), other.get(n, []), tol)[0]:
                    unsettled.add(n)
        rest = [a for a in sc["automations"] if a["name"] not in unsettled]
        if not unsettled or not rest:
            return d
        sc["automations"] = rest
        sc["name"] += " (without %s: Prefect's own firings depend on its scheduling)" % ", ".join(sorted(unsettled))
        return original(sc)

    def scenario(seed, index, _inner=fuzz.gen.scenario):
        sc = _inner(seed, index)
        current["sc"] = sc
        return sc

    fuzz.disagreement = disagreement
    fuzz.gen.scenario = scenario


def main():
    switches, rest = parse_switches(sys.argv[1:])
    fuzz = install(switches)
    if "long" in switches:
        settle(fuzz)
    if rest and rest[0] == "--print":
        seed, count = rest[1], int(rest[2]) if len(rest) > 2 else 1
        for i in range(count):
            print(json.dumps(fuzz.gen.scenario(seed, i)))
        return
    print("oracle_gen: switches %s" % (",".join(switches) or "none"), flush=True)
    sys.argv = [sys.argv[0]] + rest
    fuzz.main()


if __name__ == "__main__":
    main()
