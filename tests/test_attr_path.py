"""Attribute paths (-A): Nix's quoting of names with dots, parsed and rendered."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from purestore.errors import UsageError
from purestore.expr.attr_path import parse_attr_path, render_attr_path


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters='"'), max_size=8), min_size=1, max_size=5))
def test_rendered_paths_parse_back_to_their_names(parts):
    assert parse_attr_path(render_attr_path(parts)) == parts


@given(st.text(alphabet='ab."', max_size=12))
def test_any_text_parses_or_is_a_usage_error(text):
    try:
        parse_attr_path(text)
    except UsageError as e:
        assert str(e).startswith(f"attribute path {text!r} has ")


@pytest.mark.parametrize("text, parts", [
    ("a.b", ["a", "b"]), ('a."b.c".d', ["a", "b.c", "d"]), ('a.""', ["a", ""]), ('"a"b."c', None),
    ("a..b", None), ("a.", None), (".a", None), ('x"y.z"', ["xy.z"]),
])
def test_examples(text, parts):
    if parts is None:
        with pytest.raises(UsageError):
            parse_attr_path(text)
    else:
        assert parse_attr_path(text) == parts
