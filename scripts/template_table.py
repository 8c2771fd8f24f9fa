#!/usr/bin/env python3
"""Regenerates crates/template/tests/prefect_table.json: each template of TEMPLATES rendered
as one run-deployment parameter by Prefect's own `RunDeployment.render_parameters` (sandboxed
Jinja2, ChainableUndefined, v1-template upgrade and `__prefect_kind` hydration) against EVENT.

usage: $SPUR_PREFECT_PYTHON scripts/template_table.py   (source scripts/provision.sh first)

The Rust test crates/template/tests/prefect_table.rs renders the same templates with Spur and
compares; deliberate differences are named by id in crates/template/tests/prefect_table_known.json.

Nondeterministic output is kept out of the stored results: `random` and `lipsum` are tested by
the shape of their result (`x | random in x`, `lipsum(...) | wordcount > 0`), and the memory
addresses in Python's reprs (`<generator object … at 0x7f…>`) are written as `0x…`, so that
regenerating gives the same file.
"""
import asyncio
import json
import os
import re
import sys
import tempfile
import uuid
from datetime import datetime, timezone

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="spur-template-table-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

import prefect  # noqa: E402
from prefect.server.events.actions import RunDeployment  # noqa: E402
from prefect.server.events.schemas.automations import (  # noqa: E402
    Automation, EventTrigger, Firing, Posture, TriggeredAction, TriggerState,
)
from prefect.server.events.schemas.events import ReceivedEvent  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "crates", "template", "tests", "prefect_table.json")

EVENT = {
    "id": "5f0c6e9a-3b1d-4c2e-9f7a-1a2b3c4d5e6f",
    "occurred": "2024-05-01T12:00:00Z",
    "received": "2024-05-01T12:00:01Z",
    "event": "prefect.flow-run.Completed",
    "resource": {"prefect.resource.id": "prefect.flow-run.1", "prefect.resource.name": "run-1", "team": "data"},
    "related": [
        {"prefect.resource.id": "prefect.flow.9", "prefect.resource.role": "flow", "prefect.resource.name": "etl"},
        {"prefect.resource.id": "prefect.tag.nightly", "prefect.resource.role": "tag"},
    ],
    "payload": {
        "s": "hello world", "csv": "a,b,c", "n": 12, "neg": -7, "f": 3.14, "zero": 0, "t": True,
        "no": False, "none": None, "num": "42", "pad": " 5 ", "under": "1_000", "fs": "2.5",
        "big": 123456789012345678901234, "e20": 1e20, "tiny": 0.00001, "whole": 2.0,
        "d": {"b": 2, "a": 1, "c": "x"}, "nums": [3, 1, 2], "items": ["i1", "i2"], "words": ["b", "a", "c"],
        "mixed": [1, "a", None, True, 2.5], "empty": [], "emptyd": {}, "nested": {"x": {"y": [1, {"z": "deep"}]}},
        "html": "<a href='x'>Tom & \"Jerry\"/</a>", "uni": "héllo wörld 😀", "cjk": "日本語",
        "long": "The quick brown fox jumps over the lazy dog and keeps running far away",
        "tags": "<p>Hi <b>there</b></p>", "url": "see https://example.com now", "multi": "one\ntwo\nthree",
        "pairs": [["a", 1], ["b", 2]], "bytes": 123456789, "fmt": "{} and {}", "named": "{x}-{y}",
        "tab": "a\tb", "quote": "it's", "dq": 'say "hi"', "upper": "MiXeD CaSe", "spaces": "  padded  ",
        "users": [{"name": "bo", "age": 30}, {"name": "al", "age": 25}, {"name": "cy", "age": 30}],
    },
}
LABELS = {"prefect.resource.id": "prefect.flow-run.1", "team": "data"}


def T(area, *templates):
    return [(area, t) for t in templates]


TEMPLATES = sum((
    T("types",
      "{{ event.payload.s }}", "{{ event.payload.n }}", "{{ event.payload.f }}", "{{ event.payload.t }}",
      "{{ event.payload.none }}", "{{ event.payload.d }}", "{{ event.payload.nums }}", "{{ event.payload.mixed }}",
      "{{ event.payload.empty }}", "{{ event.payload.nested }}", "x={{ event.payload.n }}", "x={{ event.payload.f }}",
      "x={{ event.payload.t }}", "x={{ event.payload.no }}", "x={{ event.payload.none }}", "x={{ event.payload.d }}",
      "x={{ event.payload.nums }}", "x={{ event.payload.mixed }}", "x={{ event.payload.nested }}",
      "x={{ event.payload.whole }}", "{{ event.payload.whole }}", "{{ 1 }}", "{{ 1.5 }}", "{{ 'a' }}",
      "{{ true }}", "{{ none }}", "{{ [1, 'a'] }}", "{{ {'k': 1} }}", "{{ (1, 2) }}", "x={{ (1, 2) }}",
      "x={{ (1,) }}", "{{ event.payload.num }}", "  {{ event.payload.n }}  ", "{{ event.payload.n }}\n",
      "{{- event.payload.n -}}", "{{ event.payload.n }}{{ event.payload.n }}", "{{ event.payload.users }}",
      "x={{ event.payload.users }}", "{{ event.payload.pairs }}", "x={{ event.payload.quote }}",
      "x={{ [event.payload.quote, event.payload.dq] }}", "x={{ event.payload.emptyd }}"),
    T("collision",
      "{{ event.payload.items }}", "x={{ event.payload.items }}", "{{ event.payload.items | length }}",
      "{{ event.payload['items'] }}", "x={{ event.payload['items'] }}", "{{ event.payload['items'] | join(',') }}"),
    T("numbers",
      "n={{ 1e20 }}", "n={{ 0.00001 }}", "n={{ 1e16 }}", "n={{ 1e15 }}", "n={{ 0.0001 }}", "n={{ 0.1 + 0.2 }}",
      "n={{ 1/3 }}", "n={{ 10/2 }}", "n={{ 7//2 }}", "n={{ -7//2 }}", "n={{ 7 % 3 }}", "n={{ -7 % 3 }}",
      "n={{ 2 ** 10 }}", "n={{ 2 ** 70 }}", "{{ 2 ** 70 }}", "n={{ 2 ** 0.5 }}", "n={{ event.payload.big }}",
      "{{ event.payload.big }}", "n={{ event.payload.e20 }}", "n={{ event.payload.tiny }}", "{{ event.payload.e20 }}",
      "{{ event.payload.tiny }}", "n={{ event.payload.e20 | string }}", "n={{ event.payload.tiny ~ '' }}",
      "n={{ [event.payload.tiny] | join(',') }}", "n={{ '%s' | format(event.payload.tiny) }}",
      "n={{ 1e20 | int }}", "n={{ 3.7 | int }}", "n={{ -3.7 | int }}", "n={{ 3.14159 | round(2) }}",
      "n={{ 2.5 | round }}", "n={{ 3.5 | round }}", "n={{ 2.567 | round(1, 'floor') }}", "n={{ 2.521 | round(1, 'ceil') }}",
      "n={{ -1.5 | abs }}", "n={{ -3 | abs }}", "n={{ 1.0 }}", "n={{ 100.0 }}", "n={{ 123456789.123 }}",
      "n={{ 1e100 }}", "n={{ -0.0 }}", "n={{ 5 / 0.5 }}", "{{ 10 / 4 }}", "{{ 10 // 4 }}", "{{ 3 * 1.5 }}",
      "n={{ event.payload.n * event.payload.f }}", "n={{ event.payload.n + 0.5 }}", "n={{ 12345678901234567 }}",
      "n={{ 9007199254740993 }}", "n={{ event.payload.f | string }}", "n={{ 1.5e-7 }}", "n={{ 2.0 ** 60 }}"),
    T("int-float",
      "{{ 'hello' | int }}", "{{ 'hello' | float }}", "{{ ' 5 ' | int }}", "{{ '1_000' | int }}", "{{ '2.5' | int }}",
      "{{ '2.5' | float }}", "{{ '42' | int }}", "{{ 'x' | int(7) }}", "{{ 'x' | float(1.5) }}", "{{ '0x1A' | int(0, 16) }}",
      "{{ '0b101' | int(0, 2) }}", "{{ '12' | int(base=8) }}", "{{ true | int }}", "{{ none | int }}", "{{ '' | int }}",
      "{{ '1e3' | float }}", "{{ '1e3' | int }}", "{{ event.payload.pad | int }}", "{{ event.payload.under | int }}",
      "{{ event.payload.fs | float }}", "{{ event.payload.num | int + 1 }}", "{{ event.payload.s | int }}",
      "{{ event.payload.n | float }}", "{{ '-3' | int }}", "{{ ' 2.5 ' | float }}", "{{ 'inf' | float }}", "{{ 'nan' | float | string }}"),
    T("filters",
      "{{ event.payload.long | truncate(20) }}", "{{ event.payload.long | truncate(20, true) }}",
      "{{ event.payload.long | truncate(20, false, '…') }}", "{{ event.payload.s | truncate(255) }}",
      "{{ event.payload.long | wordcount }}", "{{ 'ab' | center(6) }}", "x={{ 'ab' | center(7) }}x",
      "{{ 123456789 | filesizeformat }}", "{{ 1000 | filesizeformat }}", "{{ 123456789 | filesizeformat(true) }}",
      "{{ 100 | filesizeformat }}", "{{ event.payload.tags | striptags }}", "{{ event.payload.long | wordwrap(20) }}",
      "{{ event.payload.long | wordwrap(10, true, '|') }}", "{{ event.payload.html | forceescape }}",
      "{{ {'class': 'x', 'id': 'y'} | xmlattr }}", "{{ event.payload.url | urlize }}",
      "{{ event.payload.s | upper }}", "{{ event.payload.upper | lower }}", "{{ event.payload.s | title }}",
      "{{ event.payload.s | capitalize }}", "{{ event.payload.spaces | trim }}", "{{ 'xxhixx' | trim('x') }}",
      "{{ event.payload.s | replace('o', '0') }}", "{{ event.payload.s | replace('o', '0', 1) }}",
      "{{ event.payload.s | length }}", "{{ event.payload.nums | length }}", "{{ event.payload.d | length }}",
      "{{ event.payload.nums | first }}", "{{ event.payload.nums | last }}", "{{ event.payload.nums | sum }}",
      "{{ event.payload.nums | min }}", "{{ event.payload.nums | max }}", "{{ event.payload.nums | sort }}",
      "{{ event.payload.nums | sort(reverse=true) }}", "{{ event.payload.words | sort | join('-') }}",
      "{{ event.payload.nums | reverse | list }}", "{{ event.payload.s | reverse }}", "{{ event.payload.nums | join }}",
      "{{ event.payload.nums | join(', ') }}", "{{ event.payload.users | map(attribute='name') | join(',') }}",
      "{{ event.payload.users | map(attribute='name') | list }}", "{{ event.payload.users | selectattr('age', 'eq', 30) | map(attribute='name') | list }}",
      "{{ event.payload.users | rejectattr('age', 'eq', 30) | list }}", "{{ event.payload.users | sum(attribute='age') }}",
      "{{ event.payload.users | sort(attribute='name') | map(attribute='name') | join }}",
      "{{ event.payload.users | groupby('age') | map(attribute='grouper') | list }}",
      "x={{ event.payload.users | groupby('age') | list }}", "{{ event.payload.nums | select('odd') | list }}",
      "{{ event.payload.nums | reject('odd') | list }}", "{{ event.payload.nums | map('string') | join('|') }}",
      "{{ [1, 2, 2, 3, 1] | unique | list }}", "{{ event.payload.nums | batch(2) | list }}",
      "{{ event.payload.nums | slice(2) | list }}", "{{ event.payload.d | dictsort }}", "x={{ event.payload.d | dictsort }}",
      "x={{ event.payload.d | dictsort(reverse=true) }}", "{{ event.payload.d | items | list }}",
      "x={{ event.payload.d | items | list }}", "{{ event.payload.missing | default('d') }}",
      "{{ event.payload.none | default('d') }}", "{{ event.payload.none | default('d', true) }}",
      "{{ '' | default('d', true) }}", "{{ event.payload.missing | default(default_value='d') }}",
      "{{ event.payload.missing | d('short') }}", "{{ event.payload.multi | indent(2) }}",
      "{{ event.payload.multi | indent('> ') }}", "{{ event.payload.multi | indent(2, true) }}",
      "{{ event.payload.html | e }}", "{{ event.payload.html | escape }}", "{{ \"'\" | e }}", "{{ '/' | e }}",
      "{{ event.payload.d | tojson }}", "{{ event.payload.d | tojson(2) }}", "{{ event.payload.uni | tojson }}",
      "{{ event.payload.html | tojson }}", "{{ event.payload | tojson }}", "{{ {'a': 'x y', 'b': 1} | urlencode }}",
      "{{ 'a b&c' | urlencode }}", "{{ [('a', 'x y'), ('b', 2)] | urlencode }}", "{{ event.payload.d | pprint }}",
      "{{ event.payload.s | pprint }}", "{{ '%s-%s' | format('a', 'b') }}", "{{ '%r' | format('a') }}",
      "{{ '%d' | format(3.14) }}", "{{ '%.2f' | format(3.14159) }}", "{{ '%5d|' | format(42) }}",
      "{{ '%(x)s' | format(x=1) }}", "{{ event.payload.n | string }}", "{{ event.payload.s | list }}",
      "{{ 'abc' | list }}", "{{ event.payload.d | list }}", "{{ event.payload.nums | random in event.payload.nums }}",
      "{{ event.payload.s | safe }}", "{{ event.payload.html | safe }}", "{{ event.payload.s | attr('upper') is defined }}",
      "{{ event.payload.d | attr('a') }}", "{{ event.payload.users | map(attribute='age') | unique | list }}",
      "{{ event.payload.long | truncate(20, leeway=0) }}", "{{ 'Hello' | count }}", "{{ event.payload.nums | count }}",
      "{{ lipsum(1, false, 3, 3) | wordcount > 0 }}", "{{ event.payload.users | min(attribute='age') }}",
      "{{ event.payload.users | max(attribute='age') }}", "{{ event.payload.nums | map('abs') | list }}",
      "{{ 1234567 | humanize_intcomma }}", "{{ 3 | humanize_ordinal }}", "{{ 1234567 | humanize_intword }}",
      "{{ 5 | humanize_apnumber }}", "{{ 0.3 | humanize_fractional }}", "{{ 1234567 | humanize_naturalsize }}",
      "{{ event.occurred | humanize_naturaltime | length > 0 }}", "{{ 'a' * 3 }}"),
    T("tests",
      "{{ 'abc' is sequence }}", "{{ event.payload.nums is sequence }}", "{{ event.payload.d is sequence }}",
      "{{ 5 is sequence }}", "{{ event.payload.d is mapping }}", "{{ event.payload.nums is mapping }}",
      "{{ event.payload.s is string }}", "{{ event.payload.n is number }}", "{{ event.payload.f is number }}",
      "{{ event.payload.t is number }}", "{{ event.payload.n is integer }}", "{{ event.payload.f is float }}",
      "{{ event.payload.t is boolean }}", "{{ event.payload.none is none }}", "{{ event.payload.missing is defined }}",
      "{{ event.payload.missing is undefined }}", "{{ event.payload.s is defined }}", "{{ event.payload.nums is iterable }}",
      "{{ event.payload.s is iterable }}", "{{ event.payload.n is iterable }}", "{{ 3 is odd }}", "{{ 4 is even }}",
      "{{ 9 is divisibleby(3) }}", "{{ event.payload.s is lower }}", "{{ event.payload.upper is upper }}",
      "{{ 'A' is upper }}", "{{ 1 is eq(1) }}", "{{ 1 is ne(2) }}", "{{ 1 is lt(2) }}", "{{ 2 is ge(2) }}",
      "{{ 'a' is in('abc') }}", "{{ 2 is in(event.payload.nums) }}", "{{ event.payload.s is true }}",
      "{{ event.payload.t is true }}", "{{ event.payload.no is false }}", "{{ event.payload.d is callable }}",
      "{{ event.payload.s is escaped }}", "{{ (event.payload.html | e) is escaped }}", "{{ 1 is sameas(1) }}",
      "{{ event.payload.none is sameas(none) }}", "{{ 'x' is filter }}", "{{ 'upper' is filter }}",
      "{{ 'odd' is test }}", "{{ event.payload.big is integer }}", "{{ event.payload.big is number }}"),
    T("operators",
      "{{ 1 + 2 }}", "{{ 'a' ~ 1 }}", "{{ 'a' + 'b' }}", "{{ [1] + [2] }}", "{{ 'ab' * 2 }}", "{{ [1] * 2 }}",
      "{{ 1 == 1.0 }}", "{{ 1 < 2 < 3 }}", "{{ 'a' < 'b' }}", "{{ 'a' in 'cat' }}", "{{ 1 in [1, 2] }}",
      "{{ 'a' in {'a': 1} }}", "{{ 'z' not in event.payload.d }}", "{{ not event.payload.t }}",
      "{{ event.payload.t and event.payload.n }}", "{{ event.payload.no or 'fallback' }}", "{{ event.payload.none or 'x' }}",
      "{{ 0 or [] or 'last' }}", "{{ event.payload.n if event.payload.t else 'no' }}", "{{ 'yes' if event.payload.missing else 'no' }}",
      "{{ 'a' if false }}", "x={{ 'a' if false }}", "{{ event.payload.nums[0] }}", "{{ event.payload.nums[-1] }}",
      "{{ event.payload.nums[1:] }}", "{{ event.payload.nums[::-1] }}", "{{ event.payload.s[0:5] }}",
      "{{ event.payload.s[::-1] }}", "{{ event.payload.d['a'] }}", "{{ event.payload.d.a }}", "{{ event.payload['d']['c'] }}",
      "{{ event.payload.nested.x.y[1].z }}", "{{ event.payload.nums[10] }}", "x={{ event.payload.nums[10] }}",
      "{{ 1 < 'a' }}", "{{ [1, 'a'] | sort }}", "{{ event.payload.n > 4 }}", "{{ event.payload.missing > 4 }}",
      "{{ event.payload.s == 'hello world' }}", "{{ -event.payload.n }}", "{{ (1, 2) == (1, 2) }}",
      "{{ [1, 2] == [1, 2] }}", "{{ {'a': 1} == {'a': 1} }}", "{{ none is none }}", "{{ 10 - 2.5 }}",
      "{{ event.payload.n // 5 }}", "{{ event.payload.n % 5 }}", "{{ event.payload.t + 1 }}",
      "{{ 'x' ~ none }}", "{{ 'x' ~ event.payload.missing }}", "{{ 'x' ~ [1] }}", "{{ 'x' ~ event.payload.f }}"),
    T("methods",
      "{{ event.payload.get('missing', 'd') }}", "{{ event.payload.get('n') }}", "{{ event.payload.get('missing') }}",
      "{{ event.payload.d.get('a') }}", "{{ event.payload.csv.split(',') }}", "x={{ event.payload.csv.split(',') }}",
      "{{ event.payload.s.split() }}", "{{ event.payload.csv.split(',', 1) }}", "{{ event.payload.csv.rsplit(',', 1) }}",
      "{{ event.payload.d.items() | list }}", "x={{ event.payload.d.items() | list }}", "{{ event.payload.d.keys() | list }}",
      "{{ event.payload.d.values() | list }}", "x={{ event.payload.d.keys() | list }}", "{{ event.payload.s.upper() }}",
      "{{ event.payload.upper.lower() }}", "{{ event.payload.s.title() }}", "{{ event.payload.s.capitalize() }}",
      "{{ event.payload.s.startswith('hell') }}", "{{ event.payload.s.endswith('ld') }}", "{{ event.payload.s.startswith(('x', 'h')) }}",
      "{{ event.payload.s.replace('l', 'L') }}", "{{ event.payload.s.replace('l', 'L', 1) }}", "{{ event.payload.fmt.format(1, 2) }}",
      "{{ event.payload.named.format(x=1, y='b') }}", "{{ event.payload.s.count('l') }}", "{{ event.payload.nums.count(1) }}",
      "{{ event.payload.spaces.strip() }}", "{{ event.payload.spaces.lstrip() }}", "{{ event.payload.spaces.rstrip() }}",
      "{{ 'xxhixx'.strip('x') }}", "{{ event.payload.s.find('o') }}", "{{ event.payload.s.find('z') }}",
      "{{ event.payload.s.index('o') }}", "{{ event.payload.num.isdigit() }}", "{{ event.payload.s.isdigit() }}",
      "{{ event.payload.s.isalpha() }}", "{{ 'abc'.isalnum() }}", "{{ event.payload.upper.swapcase() }}",
      "{{ event.payload.s.islower() }}", "{{ event.payload.upper.isupper() }}", "{{ 'a b'.istitle() }}",
      "{{ ', '.join(event.payload.words) }}", "{{ '-'.join(['a', 'b']) }}", "{{ event.payload.s.center(15, '*') }}",
      "{{ event.payload.num.zfill(5) }}", "{{ event.payload.s.ljust(13, '.') }}", "{{ event.payload.s.rjust(13, '.') }}",
      "{{ event.payload.s.partition(' ') }}", "x={{ event.payload.s.partition(' ') }}", "{{ event.payload.s.splitlines() }}",
      "{{ event.payload.multi.splitlines() }}", "{{ event.payload.s.encode('utf-8') is defined }}",
      "{{ event.payload.s.removeprefix('hello ') }}", "{{ event.payload.s.removesuffix(' world') }}",
      "{{ event.payload.nums.index(2) }}", "{{ event.resource.get('team') }}", "{{ event.resource.get('nope', 'x') }}",
      "{{ event.resource.keys() | list }}", "{{ event.resource.items() | list }}", "{% for k, v in event.payload.d.items() %}{{ k }}={{ v }};{% endfor %}",
      "{% for k in event.payload.d.keys() %}{{ k }}{% endfor %}", "{% for v in event.payload.d.values() %}{{ v }}{% endfor %}",
      "{% for k, v in event.payload.d | dictsort %}{{ k }}{{ v }}{% endfor %}", "{{ event.payload.d.items() }}",
      "x={{ event.payload.d.keys() }}", "{{ event.payload.s.casefold() }}", "{{ event.payload.tab.expandtabs(4) }}",
      "{{ event.payload.d.copy() }}", "{{ event.payload.d.setdefault('z', 1) }}", "{{ event.payload.nums.append(4) }}",
      "{{ event.payload.s.__class__ }}", "{{ event.payload.s.nope() }}", "{{ 'a,b'.split(',')[1] }}",
      "{{ event.payload.csv.split(',') | length }}", "{{ event.payload.s.split(' ')[0].upper() }}"),
    T("undefined",
      "{{ event.payload.missing }}", "x={{ event.payload.missing }}", "x={{ event.payload.missing.deeper }}",
      "x={{ event.payload.missing['k'] }}", "x={{ nothing }}", "x={{ nothing.at.all }}", "{{ event.payload.missing | tojson }}",
      "x={{ event.payload.missing | upper }}", "x={{ event.payload.missing | length }}", "x={{ event.payload.missing | int }}",
      "x={{ event.payload.missing | float }}", "x={{ event.payload.missing | list }}", "x={{ event.payload.missing | join }}",
      "{% if event.payload.missing %}y{% else %}n{% endif %}", "{% for x in event.payload.missing %}{{ x }}{% endfor %}.",
      "x={{ event.payload.missing ~ 'a' }}", "x={{ event.payload.missing + 1 }}", "x={{ event.payload.missing == none }}",
      "x={{ event.payload.missing is none }}", "x={{ event.payload.missing() }}", "x={{ event.payload.none.attr }}",
      "x={{ event.resource.role }}", "x={{ event.resource.nope }}", "x={{ event.resource_in_role['nope'].name }}",
      "x={{ labels.nope }}", "x={{ labels.prefect.nope }}", "x={{ event.payload.missing | default('') | upper }}",
      "x={{ event.payload.s.missing }}", "x={{ event.payload.nums.missing }}", "x={{ event.payload.missing | string }}",
      "x={{ event.payload.missing | e }}", "x={{ event.payload.missing | trim }}",
      "{% if event.payload.missing > 4 %}big{% else %}small{% endif %}", "x={{ event.payload.missing < 4 }}",
      "x={{ 4 >= event.payload.missing }}", "x={{ 1 < event.payload.n < event.payload.missing }}",
      "x={{ event.payload.missing == 1 < 2 }}", "x={{ event.payload.missing is gt(3) }}",
      "x={{ event.payload.missing | default(0) > 3 }}", "x={{ (event.payload.missing or 0) <= 3 }}",
      "{% for i in event.payload.nums if i > event.payload.missing %}{{ i }}{% endfor %}.",
      "x={{ event.payload.missing != 4 }}", "x={{ event.payload.n >= 3 }}"),
    T("control",
      "{% if event.payload.n > 10 %}big{% else %}small{% endif %}", "{% if event.payload.n > 100 %}a{% elif event.payload.n > 10 %}b{% else %}c{% endif %}",
      "{% for i in event.payload.nums %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}",
      "{% for i in event.payload.nums %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{% endfor %}",
      "{% for i in event.payload.nums %}{{ loop.first }}{{ loop.length }}{% endfor %}",
      "{% for i in event.payload.nums if i > 1 %}{{ i }}{% endfor %}", "{% for i in event.payload.empty %}x{% else %}empty{% endfor %}",
      "{% for i in range(3) %}{{ i }}{% endfor %}", "{% for i in range(1, 10, 3) %}{{ i }}{% endfor %}",
      "{% for i in range(200) %}{% endfor %}", "{{ range(3) | list }}", "x={{ range(3) }}", "{{ range(3) }}",
      "{% set x = 5 %}{{ x * 2 }}", "{% set x, y = 1, 2 %}{{ x + y }}", "{% set l = [] %}{{ l }}",
      "{% set s %}inner {{ event.payload.n }}{% endset %}{{ s | upper }}", "{% with a = 1 %}{{ a }}{% endwith %}",
      "{% macro m(a, b='B') %}{{ a }}-{{ b }}{% endmacro %}{{ m('A') }}", "{% macro m(a) %}{{ a }}{{ kwargs }}{% endmacro %}{{ m(1, z=2) }}",
      "{% macro m() %}{{ varargs }}{% endmacro %}{{ m(1, 2) }}", "{% filter upper %}shout {{ event.payload.s }}{% endfilter %}",
      "{% raw %}{{ not rendered }}{% endraw %}", "{# comment #}after", "{% for i in [1,2,3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
      "{% for i in [1,2,3] %}{% if i == 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}",
      "{% for a in [1,2] %}{% for b in [3,4] %}{{ a }}{{ b }} {% endfor %}{% endfor %}",
      "{% for a in [1] %}{% for b in [1] %}{% for c in [1] %}x{% endfor %}{% endfor %}{% endfor %}",
      "{% for u in event.payload.users %}{{ u.name }}:{{ u['age'] }} {% endfor %}", "{% for c in 'abc' %}{{ c }}.{% endfor %}",
      "{% for k in event.payload.d %}{{ k }}{% endfor %}", "{% for x in event.payload.nums | sort %}{{ loop.cycle('a', 'b') }}{% endfor %}",
      "{% set c = cycler('a', 'b') %}{{ c.next() }}{{ c.next() }}{{ c.next() }}", "{% set j = joiner(', ') %}{% for i in [1,2] %}{{ j() }}{{ i }}{% endfor %}",
      "{% set ns = namespace(total=0) %}{% for i in event.payload.nums %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }}",
      "{% for i in [1,2,3] %}{{ loop.previtem }}{{ loop.nextitem }};{% endfor %}", "{%- if true -%}  trimmed  {%- endif -%}",
      "line1\n{% if true %}\nline2\n{% endif %}\nline3", "{{ dict(a=1, b=2) }}", "{{ dict(a=1) | tojson }}",
      "{% for i in event.payload.nums %}{% set _ = 1 %}{% endfor %}ok", "{% do event.payload.nums.append(1) %}",
      "{% for i in event.payload.nums recursive %}{{ i }}{% endfor %}", "{% if event.payload.nums %}has{% endif %}",
      "{% if event.payload.empty %}has{% else %}none{% endif %}", "{% if event.payload.emptyd %}has{% else %}none{% endif %}",
      "{% if '0' %}t{% endif %}", "{% if 0.0 %}t{% else %}f{% endif %}"),
    T("escaping",
      "{{ event.payload.html }}", "x={{ event.payload.html }}", "{{ event.payload.html | e }}", "x={{ '<>&\"\\'' | e }}",
      "{{ event.payload.html | striptags }}", "{{ '&amp; &lt;' | striptags }}", "{{ '<b>x</b>' | safe | e }}",
      "{{ 'a\\nb' }}", "{{ 'a\\tb' }}", "{{ \"it's\" }}", "{{ 'say \"hi\"' }}", "{{ '\\\\' }}", "{{ '\\u00e9' }}",
      "{{ event.payload.quote }}", "{{ event.payload.dq }}", "x={{ [event.payload.tab] }}", "x={{ {'k': event.payload.multi} }}",
      "{{ '{{' }}", "{{ '}}' }}", "<< event.payload.s >>", "x=<< event.payload.n >>", "<< event.payload.s | upper >>",
      "cat <<EOF", "{{ event.payload.html | urlencode }}", "{{ event.payload.html | tojson }}", "{{ '\\x00' | length }}"),
    T("unicode",
      "{{ event.payload.uni }}", "{{ event.payload.uni | upper }}", "{{ event.payload.uni | length }}", "{{ event.payload.cjk | length }}",
      "{{ event.payload.uni | reverse }}", "{{ event.payload.uni[0:3] }}", "{{ event.payload.uni | tojson }}", "x={{ [event.payload.uni] }}",
      "{{ event.payload.uni | title }}", "{{ 'ß' | upper }}", "{{ 'İ' | lower | length }}", "{{ event.payload.uni | urlencode }}",
      "{{ event.payload.cjk | center(9, '*') }}", "{{ event.payload.uni.split(' ') }}", "{{ event.payload.uni | wordcount }}",
      "{{ '😀' | length }}", "{{ '😀' | tojson }}", "{{ event.payload.uni | truncate(9) }}", "{{ 'ǅ' | lower }}",
      "{{ event.payload.uni.encode is defined }}", "{{ event.payload.uni | e }}", "{{ event.payload.cjk ~ event.payload.uni }}"),
    T("context",
      "{{ event.id }}", "x={{ event.id }}", "{{ event.id | string }}", "{{ event.occurred }}", "x={{ event.occurred }}",
      "{{ event.occurred | string }}", "{{ event.occurred.year }}", "{{ event.occurred.isoformat() }}",
      "{{ event.occurred.strftime('%Y-%m-%d') }}", "x={{ event.occurred.date() }}", "x={{ event.occurred.tzinfo }}",
      "{{ event.id.hex }}", "{{ event.event }}", "{{ event.resource.id }}", "{{ event.resource.name }}",
      "{{ event.resource['prefect.resource.name'] }}", "{{ event.resource_in_role['flow'].name }}",
      "{{ event.resources_in_role['tag'] | length }}", "{{ event.related | length }}", "{{ event.related[0].role }}",
      "{{ event.related[0].id }}", "{{ labels['prefect.resource.id'] }}", "{{ labels.team }}", "{{ labels.prefect.resource.id }}",
      "x={{ labels }}", "{{ labels }}", "{{ event.payload }}", "{{ event.resource.labels.team }}",
      "x={{ event.resource.labels.team }}", "{{ event.resource.team }}", "{{ event | tojson | length > 10 }}",
      "{{ automation.name }}", "{{ event.payload.keys() | list | length }}", "{{ event.follows }}", "x={{ event.follows }}",
      "{{ event.received.year }}", "{{ event.occurred.timestamp() }}", "{{ event.resource.role }}", "{{ (event.payload.nums | map('string') | list) }}",
      "x={{ event.payload.nums | map('string') }}", "x={{ event.payload.users | selectattr('age', 'eq', 30) }}"),
), [])

KIND_CASES = [
    ("prefect-kind", {"__prefect_kind": "json", "value": "[1, 2]"}),
    ("prefect-kind", {"__prefect_kind": "json", "value": "{\"a\": 1.5}"}),
    ("prefect-kind", {"__prefect_kind": "json", "value": "not json"}),
    ("prefect-kind", {"__prefect_kind": "json"}),
    ("prefect-kind", {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": "{{ event.payload.nums | tojson }}"}}),
    ("prefect-kind", {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": "{{ event.payload.n }}"}}),
    ("prefect-kind", {"__prefect_kind": "jinja", "template": "{{ event.payload.n }}"}),
    ("prefect-kind", {"__prefect_kind": "jinja", "template": "{{ event.payload.d }}"}),
    ("prefect-kind", {"__prefect_kind": "jinja", "template": "plain"}),
    ("prefect-kind", {"__prefect_kind": "jinja"}),
    ("prefect-kind", {"__prefect_kind": "jinja", "template": "{{ oops("}),
    ("prefect-kind", {"__prefect_kind": "none", "value": "{{ event.payload.n }}"}),
    ("prefect-kind", {"__prefect_kind": "none", "value": {"a": "{{ event.payload.s }}"}}),
    ("prefect-kind", {"__prefect_kind": "none"}),
    ("prefect-kind", {"__prefect_kind": "whatever", "value": 7}),
    ("prefect-kind", {"__prefect_kind": "whatever"}),
    ("prefect-kind", {"a": {"__prefect_kind": "jinja", "template": "{{ event.payload.s | upper }}"}, "b": ["{{ event.payload.n }}", "x"]}),
    ("prefect-kind", ["{{ event.payload.n }}", {"k": "{{ event.payload.f }}"}, {"__prefect_kind": "json", "value": "3"}]),
    ("prefect-kind", {"nested": {"deeper": "n={{ event.payload.n }}"}}),
    ("prefect-kind", {"__prefect_kind": "json", "value": "123456789012345678901234"}),
    ("prefect-kind", {"__prefect_kind": "jinja", "template": "   {{ event.payload.n }}   "}),
    ("prefect-kind", 5),
    ("prefect-kind", None),
    ("prefect-kind", "no template at all"),
]


def ts(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def render(param, event):
    try:
        automation = _automation(param)
    except Exception as exc:  # refused when the automation is created (validation)
        return {"invalid": f"{type(exc).__name__}: {exc}"[:300]}
    return await _render(automation, event)


def _automation(param):
    return Automation(
        name="table", trigger=EventTrigger(expect={"x"}, posture=Posture.Reactive),
        actions=[RunDeployment(source="selected", deployment_id=uuid.uuid4(), parameters={"p": param})],
    )


async def _render(automation, event):
    action = automation.actions[0]
    firing = Firing(
        trigger=automation.trigger, trigger_states={TriggerState.Triggered},
        triggered=ts("2024-05-01T12:00:02Z"), triggering_labels=LABELS, triggering_event=event,
    )
    ta = TriggeredAction(
        automation=automation, firing=firing, triggered=firing.triggered,
        triggering_labels=firing.triggering_labels, triggering_event=event, action=action, action_index=0,
    )
    try:
        params = await action.render_parameters(ta)
    except Exception as exc:  # the action fails: no run
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if "p" not in params:
        return {"absent": True}
    try:
        # What Prefect would send as the flow run's parameters (JSON).
        text = json.dumps(params["p"])
    except Exception as exc:  # not JSON serializable: creating the run fails
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    try:
        # inf and nan have no JSON spelling: such a case cannot be compared, it is left out.
        return {"ok": _stable(json.loads(json.dumps(params["p"], allow_nan=False)))}
    except ValueError:
        return {"nonfinite": text}


def _stable(value):
    """`value` with memory addresses in reprs blanked (they change on every run)."""
    if isinstance(value, str):
        return re.sub(r" at 0x[0-9a-f]+", " at 0x…", value)
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    return value


async def main():
    event = ReceivedEvent.model_validate(EVENT)
    cases = []
    counts = {}
    for area, template in list(TEMPLATES) + KIND_CASES:
        counts[area] = counts.get(area, 0) + 1
        cid = f"{area}-{counts[area]:03d}"
        outcome = await render(template, event)
        if "nonfinite" in outcome:
            print(f"left out {cid} {template!r}: Prefect gives {outcome['nonfinite']}, not JSON", file=sys.stderr)
            continue
        cases.append({"id": cid, "area": area, "template": template, "prefect": outcome})
    doc = {
        "generator": "scripts/template_table.py",
        "prefect_version": prefect.__version__,
        "jinja2_version": __import__("jinja2").__version__,
        "event": EVENT,
        "labels": LABELS,
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{len(cases)} templates -> {os.path.relpath(OUT)}", file=sys.stderr)


asyncio.run(main())
