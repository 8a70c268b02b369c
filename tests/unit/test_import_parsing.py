"""Reading an import's body: CSV columns and attributes, NDJSON lines, each wrong row with its line."""

from __future__ import annotations

import pytest

from iot_api.errors import Invalid, RowError
from iot_api.services.imports import parse_csv, parse_ndjson


def test_csv_columns_and_attributes() -> None:
    errors: list[RowError] = []
    rows = parse_csv(
        'id,attributes.room,name,floor,type\r\na-1,b1,"Boiler, west",2,thermo\r\n\r\na-2,,,,\r\n', errors, 10
    )
    assert errors == []
    assert [(r.line, r.id, r.name, r.type, r.attributes) for r in rows] == [
        (2, "a-1", "Boiler, west", "thermo", {"room": "b1", "floor": "2"}),
        (4, "a-2", "", "generic", {}),
    ]


def test_csv_lines_count_quoted_newlines() -> None:
    errors: list[RowError] = []
    rows = parse_csv('id,name\na,"two\nlines"\nb,x,extra\nc,y\n', errors, 10)
    assert [(r.line, r.id) for r in rows] == [(3, "a"), (5, "c")]
    assert [(e.line, e.id, e.field) for e in errors] == [(4, "b", "row")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no header"),
        ("name,type\n", "no `id`"),
        ("id,room,attributes.room\n", "repeats"),
        ("id,,x\n", "empty"),
    ],
)
def test_csv_header_refused(text: str, message: str) -> None:
    with pytest.raises(Invalid, match=message):
        parse_csv(text, [], 10)


def test_rows_past_the_limit_refuse_the_body() -> None:
    with pytest.raises(Invalid, match="more than 2 rows"):
        parse_csv("id\na\nb\nc\n", [], 2)
    with pytest.raises(Invalid, match="more than 2 rows"):
        parse_ndjson(b'{"id":"a"}\n{"id":"b"}\n{"id":"c"}\n', [], 2)


def test_ndjson_rows_and_their_errors() -> None:
    errors: list[RowError] = []
    body = b'{"id":"a","attributes":{"n":1}}\n\n[1]\n{"id":"b","x":1}\n{"id":5}\n{oops\n{"id":"c","type":"t"}'
    rows = parse_ndjson(body, errors, 10)
    assert [(r.line, r.id, r.type, r.attributes) for r in rows] == [
        (1, "a", "generic", {"n": 1}),
        (7, "c", "t", {}),
    ]
    assert [(e.line, e.field) for e in errors] == [(3, "row"), (4, "x"), (5, "id"), (6, "row")]
