"""shared/step_columns.py: a metrics_batch read as columns accepts only what the general
decoder (shared/protocol.py `decode`, field by field through shared/records.py) accepts, and
gives the same values — on hand-written bytes (literals), on Hypothesis-drawn valid batches
and on the same batches with one thing broken (then it must step aside: None)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import protocol as p
from shared import step_columns
from shared.errors import ProtocolError

PROPS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

# What a worker sends (two rows: the second one as an older worker would: no optional
# fields, a non-finite loss as the wire's string, an integer where a float belongs).
RAW = (b'{"run_id":"r1","attempt":2,"token":"' + b"ab" * 16 + b'","steps":['
       b'{"step":120,"time":1700000000.25,"loss":2.31,"grad_norm":0.82,"lr":1e-05,'
       b'"tokens":4096,"tokens_per_sec":812.5,"step_seconds":5.04,"active_mb":812.0,'
       b'"peak_mb":900.1,"rss_mb":1400.2,"data_position":121,"cache_mb":96.0,'
       b'"footprint_mb":2210.5},'
       b'{"step":121,"time":1700000005.5,"loss":"nan","grad_norm":"inf","lr":0,'
       b'"tokens":4000,"tokens_per_sec":800.0,"step_seconds":5.0,"active_mb":813.0,'
       b'"peak_mb":901.0,"rss_mb":1401.0}],"type":"metrics_batch","v":1}')


def test_a_batch_reads_as_its_columns() -> None:
    cols = step_columns.parse(RAW)
    assert cols is not None
    assert (cols.run_id, cols.attempt, cols.token, cols.rank) == ("r1", 2, "ab" * 16, 0)
    assert cols.step == (120, 121) and cols.tokens == (4096, 4000)
    assert cols.time == (1700000000.25, 1700000005.5)
    assert cols.loss[0] == 2.31 and math.isnan(cols.loss[1])
    assert cols.grad_norm[1] == math.inf
    assert cols.lr == (1e-05, 0.0) and type(cols.lr[1]) is float  # an int read as a float
    assert cols.data_position == (121, -1)  # StepRow's defaults for what an older row lacks
    assert cols.cache_mb == (96.0, 0.0) and cols.footprint_mb == (2210.5, 0.0)
    assert cols.step_seconds == (5.04, 5.0) and cols.rss_mb == (1400.2, 1401.0)
    last = cols.row(1)
    assert isinstance(last, p.StepMetrics) and (last.step, last.tokens, last.token) == (
        121, 4000, "ab" * 16)
    assert str(cols.unfold()) == str(p.decode_all(RAW))  # str: NaN != NaN


def test_a_single_metrics_message_and_other_types_are_not_batches() -> None:
    """Older workers' single `metrics` messages (and heartbeats, ...) go the general way."""
    single = p.StepMetrics("r1", 1, 5, 1.5, 2.25, 0.5, 1e-4, 128, 512.0, 0.25, 10.0, 20.0,
                           30.0).to_json()
    assert step_columns.parse(single) is None
    assert p.decode_all(single)[0].step == 5


HOSTILE = {
    "a loss that is a word": RAW.replace(b'"loss":2.31', b'"loss":"x"'),
    "a step that is true": RAW.replace(b'"step":120', b'"step":true'),
    "a step that is a float": RAW.replace(b'"step":120', b'"step":120.0'),
    "a step past 64 bits": RAW.replace(b'"step":120', b'"step":9223372036854775808'),
    "a step far past 64 bits": RAW.replace(b'"step":120', b'"step":' + b"9" * 25),
    "a loss that was an integer past 64 bits": RAW.replace(b'"loss":2.31',
                                                           b'"loss":' + b"9" * 25),
    "a nested loss": RAW.replace(b'"loss":2.31', b'"loss":[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]'),
    "a row without its loss": RAW.replace(b'"loss":2.31,', b""),
    "a row with a stranger": RAW.replace(b'"step":120', b'"x":1,"step":120'),
    "a row that is a list": RAW.replace(b'"steps":[', b'"steps":[[1],'),
    "no rows": RAW.split(b'"steps":[')[0] + b'"steps":[],"type":"metrics_batch","v":1}',
    "65 rows": json.dumps({"type": "metrics_batch", "v": 1, "run_id": "r", "attempt": 1,
                           "steps": [json.loads(RAW)["steps"][0]] * 65}).encode(),
    "version 2": RAW.replace(b'"v":1', b'"v":2'),
    "version true": RAW.replace(b'"v":1', b'"v":true'),
    "an attempt that is a string": RAW.replace(b'"attempt":2', b'"attempt":"2"'),
    "a token that is a number": RAW.replace(b'"token":"' + b"ab" * 16 + b'"', b'"token":7'),
    "an unknown envelope field": RAW.replace(b'"attempt":2', b'"attempt":2,"extra":1'),
    "a NaN token": RAW.replace(b'"loss":2.31', b'"loss":NaN'),
    "a huge exponent": RAW.replace(b'"loss":2.31', b'"loss":1e999'),
    "cut off": RAW[:-5],
    "too large": RAW[:-1] + b" " * p.MAX_MESSAGE_BYTES + b"}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_batch_is_left_to_the_general_decoder_which_refuses_it(name: str) -> None:
    raw = HOSTILE[name]
    assert step_columns.parse(raw) is None
    with pytest.raises(ProtocolError):
        p.decode(raw)


FINITE = st.floats(allow_nan=False, allow_infinity=False)
FLOATS = st.one_of(FINITE, st.sampled_from([math.nan, math.inf, -math.inf]),
                   st.integers(-(2**53), 2**53).map(float))
INTS = st.integers(-(2**63), 2**63 - 1)


@st.composite
def batches(draw: Any) -> p.StepMetricsBatch:
    n = draw(st.integers(1, 7))  # a flush at ~150 steps/s; 64 rows: the literal tests
    rank = draw(st.sampled_from([0, 0, 1, 3]))
    token = draw(st.sampled_from(["", "ab" * 16, "9" * 32]))
    rows = [p.StepMetrics("r" + draw(st.text(max_size=8)), draw(INTS), draw(INTS),
                          *(draw(FLOATS) for _ in range(4)), draw(INTS),
                          *(draw(FLOATS) for _ in range(5)), draw(INTS), draw(FLOATS),
                          draw(FLOATS), token=token, rank=rank)
            for _ in range(n)]
    return p.StepMetricsBatch.fold(rows)


@PROPS
@given(batches())
def test_any_valid_batch_reads_as_the_general_decoder_reads_it(batch: p.StepMetricsBatch,
                                                               ) -> None:
    raw = batch.to_json()
    cols = step_columns.parse(raw)
    expected = p.decode_all(raw)
    if cols is None:  # stepped aside: only for magnitudes orjson may have read from ints
        assert any(abs(v) >= 2.0**63 for m in expected for v in vars(m).values()
                   if isinstance(v, float) and math.isfinite(v))
        return
    assert repr(cols.unfold()) == repr(expected)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INTS | FINITE | st.text(max_size=5)
    | st.sampled_from(["nan", "inf", "-inf", "NaN"]) | st.integers(2**63, 2**70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3), max_leaves=6)


@PROPS
@given(batches(), st.data())
def test_a_batch_with_one_thing_broken_reads_the_same_or_not_at_all(
        batch: p.StepMetricsBatch, data: Any) -> None:
    obj = json.loads(batch.to_json())
    how = data.draw(st.sampled_from(["row value", "row key", "drop row key", "envelope"]))
    row = data.draw(st.sampled_from(obj["steps"]))
    if how == "row value":
        row[data.draw(st.sampled_from(sorted(row)))] = data.draw(JSON_VALUES)
    elif how == "row key":
        row[data.draw(st.text(max_size=4))] = data.draw(JSON_VALUES)
    elif how == "drop row key":
        del row[data.draw(st.sampled_from(sorted(row)))]
    else:
        obj[data.draw(st.sampled_from(["run_id", "attempt", "token", "rank", "v", "type",
                                       "steps", "x"]))] = data.draw(JSON_VALUES)
    raw = json.dumps(obj).encode()
    cols = step_columns.parse(raw)
    try:
        expected = p.decode_all(raw)
    except ProtocolError:
        assert cols is None
        return
    if cols is not None:
        assert repr(cols.unfold()) == repr(expected)
