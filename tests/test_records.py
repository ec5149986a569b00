"""shared/records.py: one decoder for the wire, the disk and the config — strict for JSON,
converting (with did-you-mean) for YAML and flags; every problem names its field."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import pytest

from shared import records


class Colour(str, Enum):
    RED = "red"
    BLUE = "blue"


class Bad(Exception):
    pass


@dataclass(frozen=True)
class Inner:
    n: int
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outer:
    name: str
    ratio: float
    on: bool
    colour: Colour
    mode: Literal["auto", "true", "false"]
    inner: Inner
    maybe: int | None = None
    items: list[Inner] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


STRICT = records.Rules(Bad)
LENIENT = records.Rules(Bad, lenient=True, suggest=True)
GOOD = {"name": "a", "ratio": 1, "on": True, "colour": "red", "mode": "auto",
        "inner": {"n": 2, "tags": ["x"]}, "items": [{"n": 3}], "extra": {"k": [1]}}


def test_a_record_is_built_and_converted_back():
    o = records.build(Outer, GOOD, "o", STRICT)
    assert o == Outer("a", 1.0, True, Colour.RED, "auto", Inner(2, ("x",)), None,
                      [Inner(3)], {"k": [1]})
    assert isinstance(o.ratio, float)
    assert records.to_dict(o) == {**GOOD, "ratio": 1.0, "maybe": None,
                                  "items": [{"n": 3, "tags": []}]}


@pytest.mark.parametrize(("change", "message"), [
    ({"ratio": "1.5"}, "o.ratio: expected a number, got '1.5'"),
    ({"on": 1}, "o.on: expected true or false, got 1"),
    ({"colour": "green"}, "o.colour: expected one of ['red', 'blue'], got 'green'"),
    ({"mode": "maybe"}, "o.mode: expected one of ['auto', 'true', 'false'], got 'maybe'"),
    ({"inner": {"n": True}}, "o.inner.n: expected an integer, got True"),
    ({"inner": {"n": 1, "tags": "x"}}, "o.inner.tags: expected a list, got 'x'"),
    ({"items": [{"n": 1}, {"n": "2"}]}, "o.items[1].n: expected an integer, got '2'"),
    ({"inner": 3}, "o.inner: expected a mapping, got 3"),
    ({"extra": []}, "o.extra: expected a mapping, got []"),
    ({"nmae": "a"}, "o: unexpected fields ['nmae']"),
])
def test_strict_rules_name_the_field_and_what_was_expected(change, message):
    with pytest.raises(Bad) as e:
        records.build(Outer, {**GOOD, **change}, "o", STRICT)
    assert str(e.value) == message


def test_a_missing_required_field_is_named():
    with pytest.raises(Bad, match=r"^o: missing field 'ratio'$"):
        records.build(Outer, {k: v for k, v in GOOD.items() if k != "ratio"}, "o", STRICT)


def test_strict_reads_non_finite_floats_from_the_strings_the_wire_writes():
    o = records.build(Outer, {**GOOD, "ratio": "-inf"}, "o", STRICT)
    assert o.ratio == float("-inf")


def test_lenient_rules_convert_values_from_yaml_and_flags():
    o = records.build(Outer, {**GOOD, "ratio": "1e-3", "on": "yes", "mode": False,
                              "inner": {"n": "4", "tags": "a, b"}, "maybe": 5.0,
                              "name": 3}, "", LENIENT)
    assert (o.ratio, o.on, o.mode, o.inner, o.maybe, o.name) == (
        1e-3, True, "false", Inner(4, ("a", "b")), 5, "3")


def test_lenient_rules_suggest_the_key_that_was_meant():
    with pytest.raises(Bad, match=r"^inner.nn: unknown key 'nn'; did you mean 'n'\?$"):
        records.build(Outer, {**GOOD, "inner": {"nn": 1}}, "", LENIENT)
    with pytest.raises(Bad, match=r"^zzz: unknown key 'zzz'$"):
        records.build(Outer, {**GOOD, "zzz": 1}, "", LENIENT)
