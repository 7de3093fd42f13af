"""Statements put together from pieces with named parameters (``store._sql``)."""

from __future__ import annotations

import pytest

from corral.supervisor.store._sql import numbered


def test_names_are_numbered_in_order_of_first_use_and_a_repeated_name_is_one_parameter() -> None:
    statement = numbered("SELECT $b::int + $a, $b, $1x, $ab FROM t WHERE c = $a")
    assert statement.text == "SELECT $1::int + $2, $1, $1x, $3 FROM t WHERE c = $2"
    assert statement.names == ("b", "a", "ab")
    assert statement.values({"a": 1, "b": 2, "ab": 3, "unused": 4}) == [2, 1, 3]


def test_dollar_quoted_strings_and_positional_parameters_are_left_alone() -> None:
    body = "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1 $body$ LANGUAGE sql"
    assert numbered(body).text == body
    assert numbered("SELECT $1, $23").names == ()


def test_a_name_without_a_value_is_an_error() -> None:
    with pytest.raises(KeyError, match="customer"):
        numbered("SELECT $customer").values({})
