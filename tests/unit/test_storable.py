"""What `storable` makes of the JSON values PostgreSQL's jsonb refuses, text by text."""

from __future__ import annotations

import math

import pytest

from shared.core.storable import MAX_JSON_DEPTH, storable


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("all ascii\x00 with a NUL", "all ascii with a NUL"),  # the fast path still drops U+0000
        ("caf\u00e9 \ud800 alone", "caf\u00e9 \ufffd alone"),
        ("\udfff\x00", "\ufffd"),
        ("a pair \U0001f600 stays", "a pair \U0001f600 stays"),
        ("plain", "plain"),
    ],
)
def test_text_keeps_what_jsonb_holds_and_loses_only_what_it_cannot(text, stored):
    assert storable({text: [text]}) == {stored: [stored]}


def test_numbers_jsonb_refuses_become_null_and_depth_is_bounded():
    assert storable([math.nan, math.inf, -math.inf, 1.5, 7]) == [None, None, None, 1.5, 7]
    deep: list = []
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = [deep]
    nested, levels = storable(deep), 1
    while nested:
        [nested], levels = nested, levels + 1
    assert (nested, levels) == (None, MAX_JSON_DEPTH + 1)
