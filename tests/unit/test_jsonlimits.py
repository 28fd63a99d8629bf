"""The bounded JSON loader: size and depth limits, Go's number rules, one error type."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflannel.jsonlimits import JsonLimitError, json_depth, loads_bounded, one_line, utf8_size

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(text: str | bytes, *, max_bytes: int = 1 << 20, max_depth: int = 32) -> Any:
    return loads_bounded(text, what="test input", max_bytes=max_bytes, max_depth=max_depth)


def refusal(text: str | bytes, **limits: int) -> str:
    with pytest.raises(JsonLimitError) as err:
        load(text, **limits)
    message = str(err.value)
    assert "\n" not in message and message.startswith("test input: ")
    return message


def depth_of(value: Any) -> int:
    """Reference nesting depth of a decoded value (recursive; only for small test data)."""
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


def test_plain_values_decode_like_json_loads() -> None:
    text = '{"PublicIP":"10.0.0.1","BackendData":{"VNI":1,"VtepMAC":"aa:bb"},"x":[1,2.5,null]}'
    assert load(text) == json.loads(text)
    assert load(b'[true, false]') == [True, False]


def test_size_is_checked_before_parsing_and_counted_in_utf8_bytes() -> None:
    assert "too large: 11 bytes (the limit is 10)" in refusal('"' + "a" * 9 + '"', max_bytes=10)
    assert load('"' + "a" * 8 + '"', max_bytes=10) == "a" * 8
    # 5 characters but 8 bytes: the limit is in bytes
    assert "too large: 8 bytes" in refusal('"ééé"', max_bytes=7)
    assert utf8_size("ééé") == 6 and utf8_size(b"abc") == 3


def test_depth_limit_is_exact() -> None:
    assert load("[" * 5 + "]" * 5, max_depth=5) == [[[[[]]]]]
    message = refusal("[" * 6 + "]" * 6, max_depth=5)
    assert "nested too deeply: 6 levels of arrays/objects (the limit is 5)" in message
    assert load('{"a":{"b":[1]}}', max_depth=3) == {"a": {"b": [1]}}
    refusal('{"a":{"b":[1]}}', max_depth=2)


def test_deep_nesting_that_made_json_loads_recurse_is_a_refusal() -> None:
    # The case: a 3 KB value nesting 1,500 arrays raised RecursionError.
    for text in ("[" * 1500 + "]" * 1500, '{"a":' * 100_000 + "1" + "}" * 100_000,
                 "[" * 200_000):
        assert "nested too deeply" in refusal(text, max_bytes=1 << 21)


def test_brackets_inside_strings_do_not_count() -> None:
    assert load('["[[[[[[[[", "{{{{\\"[[[["]', max_depth=1) == ["[[[[[[[[", '{{{{"[[[[']
    assert json_depth('"[[[[\\\\"') == 0
    assert json_depth('"\\"[[[[["') == 0
    assert json_depth('"["') == 0 and json_depth('["{"]') == 1  # found by hypothesis


def test_go_number_rules() -> None:
    for text in ("NaN", "[Infinity]", '{"a":-Infinity}'):
        assert "Go refuses NaN" in refusal(text)
    for text in ("1e999", "[-1e400]"):
        assert "out of range for a float64" in refusal(text)
    assert load("1e308") == 1e308
    assert load("[1.5, -0.0, 12345678901234567890]") == [1.5, -0.0, 12345678901234567890]
    # Python's digit limit for int() is a ValueError too, and so a refusal
    assert "invalid JSON" in refusal("1" * 5000)


def test_invalid_json_and_encodings() -> None:
    assert "invalid JSON: Expecting value" in refusal("")
    assert "invalid JSON" in refusal("{'a': 1}")
    assert "invalid JSON" in refusal('{"a":1} x')
    assert "invalid JSON" in refusal('"\\x"')
    assert "invalid JSON" in refusal("\ufeff{}")  # Go refuses a BOM as well
    # Invalid UTF-8 inside a string becomes U+FFFD, as in Go
    assert load(b'"a\xffb"') == "a\ufffdb"
    # UTF-16 is not guessed (Go reads UTF-8 only)
    refusal('{"a":1}'.encode("utf-16"))


def test_duplicate_keys_last_wins_or_pairs_hook() -> None:
    assert load('{"a":1,"a":2}') == {"a": 2}
    pairs = loads_bounded('{"a":1,"a":2}', what="x", max_bytes=100, max_depth=2,
                          object_pairs_hook=lambda p: p)
    assert pairs == [("a", 1), ("a", 2)]


def test_message_is_one_line_even_for_hostile_names() -> None:
    with pytest.raises(JsonLimitError) as err:
        loads_bounded("[", what="lease x\n\x1b[31mred", max_bytes=10, max_depth=4)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
    assert str(err.value).startswith("lease x\\n\\x1b[31mred: invalid JSON")
    assert err.value.what == "lease x\n\x1b[31mred"
    assert one_line("plain") == "plain"


def test_a_depth_limit_beyond_the_cap_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        loads_bounded("1", what="x", max_bytes=10, max_depth=100_000)
    with pytest.raises(ValueError, match="max_depth"):
        loads_bounded("1", what="x", max_bytes=10, max_depth=0)


# --- property-based -------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=30)


@FUZZ
@given(value=json_values, indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_any_json_within_limits_decodes_like_json_loads(value: Any, indent: int | None,
                                                         ascii_only: bool) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    depth = depth_of(value)
    assert json_depth(text) == depth
    assert load(text, max_depth=max(depth, 1)) == json.loads(text)
    if depth > 1:
        refusal(text, max_depth=depth - 1)
    size = utf8_size(text)
    refusal(text, max_bytes=size - 1)
    assert load(text.encode(), max_bytes=size, max_depth=max(depth, 1)) == json.loads(text)


_json_alphabet = st.sampled_from(list('[]{}",:\\ 0123456789.eE+-truefalsnIiNy\n\ud800') + ["é"])


@FUZZ
@given(text=st.text(_json_alphabet, max_size=300) | st.text(max_size=100)
       | st.binary(max_size=200))
def test_garbage_is_a_value_or_a_refusal(text: str | bytes) -> None:
    try:
        value = load(text, max_depth=8)
    except JsonLimitError as err:
        assert "\n" not in str(err)
        return
    assert depth_of(value) <= 8
    if isinstance(value, float):
        assert math.isfinite(value)


@FUZZ
@given(depth=st.integers(1, 3000), opener=st.sampled_from(["[", '{"k":']),
       tail=st.sampled_from(["", "1", "]", "}"]))
def test_any_deep_nesting_is_refused_without_recursion(depth: int, opener: str,
                                                       tail: str) -> None:
    text = opener * depth + tail
    if depth > 16:
        assert "nested too deeply" in refusal(text, max_depth=16)
    else:
        try:
            load(text, max_depth=16)
        except JsonLimitError as err:
            assert "invalid JSON" in str(err)
