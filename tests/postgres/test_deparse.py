"""The tolerances of deparsed text (EXTRACT field case, casts of whole ARRAY constructors),
only outside quoted literals, quoted identifiers and dollar-quoted bodies."""

from __future__ import annotations

import pytest

from backup_tool.postgres.deparse import TOLERATED, folded, same_when_folded, tolerated
from backup_tool.validation.validate import compare_sets


@pytest.mark.parametrize("text, expected", [
    ("SELECT EXTRACT(YEAR FROM now())", "SELECT EXTRACT(year FROM now())"),
    ("(EXTRACT(Month FROM d)) + EXTRACT(DOW FROM ts)", "(EXTRACT(month FROM d)) + EXTRACT(dow FROM ts)"),
    ("EXTRACT(year FROM $1)", "EXTRACT(year FROM $1)"),
    ("'EXTRACT(YEAR FROM x)' || EXTRACT(EPOCH FROM t)", "'EXTRACT(YEAR FROM x)' || EXTRACT(epoch FROM t)"),
    ("'it''s EXTRACT(YEAR FROM x)'", "'it''s EXTRACT(YEAR FROM x)'"),
    ('"EXTRACT(YEAR FROM x)" EXTRACT(HOUR FROM t)', '"EXTRACT(YEAR FROM x)" EXTRACT(hour FROM t)'),
    ("AS $_$ SELECT EXTRACT(YEAR FROM $1) $_$; EXTRACT(DAY FROM d)",
     "AS $_$ SELECT EXTRACT(YEAR FROM $1) $_$; EXTRACT(day FROM d)"),
    ("AS $f$ EXTRACT(YEAR FROM x) $f$", "AS $f$ EXTRACT(YEAR FROM x) $f$"),
    ("a$b$ EXTRACT(YEAR FROM x)", "a$b$ EXTRACT(year FROM x)"),
    ("date_part('YEAR'::text, x)", "date_part('YEAR'::text, x)"),
    ("extract_year(YEAR FROM x) MYEXTRACT(YEAR FROM x)", "extract_year(YEAR FROM x) MYEXTRACT(YEAR FROM x)"),
])
def test_only_deparsed_extract_fields_fold(text: str, expected: str) -> None:
    assert folded(text) == expected


def test_items_equal_only_when_their_deparsed_fields_differ_in_extract_case_alone() -> None:
    backup = {"name": "t_year", "definition": "CREATE INDEX t_year ON t USING btree (EXTRACT(YEAR FROM d))"}
    assert same_when_folded(backup, {**backup, "definition": backup["definition"].replace("YEAR", "year")})
    assert not same_when_folded(backup, {**backup, "definition": backup["definition"].replace("YEAR", "month")})
    assert not same_when_folded({"comment": "EXTRACT(YEAR FROM x)"}, {"comment": "EXTRACT(year FROM x)"})
    assert same_when_folded({"tables": ["t WHERE (EXTRACT(YEAR FROM d) > 2000)"]},
                            {"tables": ["t WHERE (EXTRACT(year FROM d) > 2000)"]})
    assert not same_when_folded({"qual": "x", "extra": 1}, {"qual": "x"})


def test_a_check_passes_on_folded_definitions_saying_so_and_fails_on_any_other_change() -> None:
    """A backup taken on PostgreSQL 15.18 or earlier recorded `EXTRACT(YEAR FROM d)`; any
    restore of it shows `EXTRACT(year FROM d)`."""
    backup = [{"schema": "public", "table": "t", "name": "t_year",
               "definition": "CREATE INDEX t_year ON public.t USING btree (EXTRACT(YEAR FROM d))"}]
    restored = [{**backup[0], "definition": backup[0]["definition"].replace("YEAR", "year")}]
    key = lambda i: f"{i['schema']}.{i['table']}.{i['name']}"  # noqa: E731
    check = compare_sets("indexes_valid", "indexes", backup, restored, key)
    assert check.ok and "1 up to what pg_dump does not keep: the letter case of EXTRACT fields" in check.detail
    assert compare_sets("indexes_valid", "indexes", backup, backup, key).detail == "1 indexes match"
    moved = [{**backup[0], "definition": backup[0]["definition"].replace("YEAR", "month")}]
    changed = compare_sets("indexes_valid", "indexes", backup, moved, key)
    assert not changed.ok and "changed public.t.t_year" in changed.detail


_IN_LIST = ("CREATE UNIQUE INDEX u ON public.w USING btree (b) WHERE ((status)::text = ANY "
            "((ARRAY['in_progress'::character varying, 'needs_changes'::character varying])::text[]))")
_READ_BACK = ("CREATE UNIQUE INDEX u ON public.w USING btree (b) WHERE ((status)::text = ANY "
              "(ARRAY[('in_progress'::character varying)::text, ('needs_changes'::character varying)::text]))")


@pytest.mark.parametrize("text, expected", [
    (_IN_LIST, _READ_BACK),
    (_READ_BACK, _READ_BACK),
    ("((\"Q\")::text = ANY ((ARRAY['(ARRAY['::character varying, 'a,]'::character varying])::text[])))",
     "((\"Q\")::text = ANY (ARRAY[('(ARRAY['::character varying)::text, ('a,]'::character varying)::text])))"),
    ("x = ANY ((ARRAY[(a || b), f(c, d)])::public.\"My T\"(3)[])",
     "x = ANY (ARRAY[((a || b))::public.\"My T\"(3), (f(c, d))::public.\"My T\"(3)])"),
    ("(ARRAY[ARRAY[a, b], ARRAY[c]])::character varying(5)[]",
     "ARRAY[ARRAY[(a)::character varying(5), (b)::character varying(5)], ARRAY[(c)::character varying(5)]]"),
    ("f(ARRAY[a])::text[]", "f(ARRAY[a])::text[]"),
    ("x = ANY (ARRAY[a, b])", "x = ANY (ARRAY[a, b])"),
    ("'(ARRAY[a])::text[]' AS $$ (ARRAY[a])::text[] $$", "'(ARRAY[a])::text[]' AS $$ (ARRAY[a])::text[] $$"),
])
def test_casts_of_whole_array_constructors_are_written_as_read_back(text: str, expected: str) -> None:
    """Django's ``status IN ('a', 'b')`` on a varchar column is deparsed with the cast on the
    whole array; PostgreSQL reads that back with the cast on each element."""
    assert folded(text) == expected


def test_a_changed_element_or_type_of_a_cast_array_still_differs() -> None:
    assert folded(_IN_LIST) == folded(_READ_BACK)
    assert folded(_IN_LIST.replace("needs_changes", "approved")) != folded(_READ_BACK)
    assert folded(_IN_LIST.replace("::text[]", "::name[]")) != folded(_READ_BACK)
    assert not same_when_folded({"definition": _IN_LIST.replace("in_progress", "x")}, {"definition": _READ_BACK})



def test_a_check_that_passed_on_a_tolerated_form_names_that_form_alone() -> None:
    """GNUmed's `laterality IN (...)` check matched through the ARRAY-cast form, and the check
    said it matched "up to ... the letter case of EXTRACT fields ... and casts of whole ARRAY
    constructors": a form its schema does not have. Each check now names only the forms that
    made it pass."""
    key = lambda i: f"{i['schema']}.{i['table']}.{i['name']}"  # noqa: E731
    in_list = [{"schema": "public", "table": "w", "name": "u", "definition": _IN_LIST}]
    read_back = [{**in_list[0], "definition": _READ_BACK}]
    year = [{**in_list[0], "name": "y", "definition": "CREATE INDEX y ON public.w USING btree (EXTRACT(YEAR FROM d))"}]
    lower = [{**year[0], "definition": year[0]["definition"].replace("YEAR", "year")}]
    arrays = compare_sets("indexes_valid", "indexes", in_list, read_back, key)
    assert arrays.ok and "casts of whole ARRAY[...] constructors" in arrays.detail, arrays.detail
    assert "EXTRACT" not in arrays.detail, arrays.detail
    fields = compare_sets("indexes_valid", "indexes", year, lower, key)
    assert fields.ok and "EXTRACT fields" in fields.detail and "ARRAY" not in fields.detail, fields.detail
    both = compare_sets("indexes_valid", "indexes", in_list + year, read_back + lower, key)
    assert both.ok and "2 up to" in both.detail and "EXTRACT fields" in both.detail and "ARRAY" in both.detail
    assert tolerated([(_IN_LIST, _READ_BACK)]) == ("what pg_dump does not keep: casts of whole ARRAY[...]"
                                                   " constructors ((ARRAY[a, b])::T[] reads back as"
                                                   " ARRAY[(a)::T, (b)::T], the same)")
    assert tolerated([(_IN_LIST + " EXTRACT(YEAR FROM d)", _READ_BACK + " EXTRACT(year FROM d)")]) == TOLERATED
