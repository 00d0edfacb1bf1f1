"""What PostgreSQL's deparser writes in a form that reads back differently, and the one
comparison that tolerates it (two such forms are known).

``EXTRACT('YEAR' FROM x)`` (the field given as a string, as LedgerSMB and others write it) is
stored with the field as the string ``'YEAR'``. Before PostgreSQL fixed it (15.18 has it, 15.20
prints ``EXTRACT("YEAR" FROM x)``, which reads back exactly), every deparser
(``pg_get_viewdef``, ``pg_get_indexdef``, ``pg_get_triggerdef``, ``pg_get_expr``, and so
pg_dump) printed it as ``EXTRACT(YEAR FROM x)``, unquoted; read back, a bare field is an
identifier and folds to lower case, so a restore of any such view, index, trigger, policy, default, check or publication
filter (by pg_restore or by this tool) shows ``EXTRACT(year FROM x)``. ``extract()`` ignores
the letter case of its field, so both mean the same, and nothing a restore can do keeps the
upper case. Comparisons of deparsed text (the schema text, index and trigger definitions,
policy expressions, publication filters) therefore compare EXTRACT fields without their letter
case, and say so when that was what made them equal (``schema diff``, which reports
differences rather than a verdict, reads its definitions folded). Everything else, the field's spelling
included, is compared as is; quoted literals, quoted identifiers and dollar-quoted bodies
(kept verbatim by pg_dump) are never touched.

``x IN ('a', 'b')`` on a ``varchar`` column (Django writes every ``__in`` condition so: Wagtail's
``unique_in_progress_workflow`` partial index, choices check constraints) is stored as an array
of ``varchar`` coerced as a whole to ``text[]``, deparsed
``(x)::text = ANY ((ARRAY['a'::character varying, 'b'::character varying])::text[])``. Read
back, a cast written right after ``ARRAY[...]`` is applied to each element instead, so the
restore shows ``ANY (ARRAY[('a'::character varying)::text, ('b'::character varying)::text])``:
the same array, and again nothing a restore can do keeps the first form. Deparsed text is
therefore compared with each ``(ARRAY[e1, e2])::T[]`` written as PostgreSQL reads it back,
``ARRAY[(e1)::T, (e2)::T]`` (nested ``ARRAY[...]`` elements alike); any change of an element
or of the type still differs.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

_FIELDS_NOTE = ("the letter case of EXTRACT fields (EXTRACT('YEAR' FROM x) reads back as"
                " EXTRACT(year FROM x), the same)")
_ARRAYS_NOTE = ("casts of whole ARRAY[...] constructors ((ARRAY[a, b])::T[] reads back as"
                " ARRAY[(a)::T, (b)::T], the same)")
TOLERATED = f"what pg_dump does not keep: {_FIELDS_NOTE} and {_ARRAYS_NOTE}"
"""How a check says it compared deparsed text with :func:`folded` when both forms made it
pass; :func:`tolerated` names only the forms that did."""

_TOKENS = re.compile(r"""
      '[^']*(?:''[^']*)*'                       # a string literal ('' inside)
    | "[^"]*(?:""[^"]*)*"                       # a quoted identifier
    | (?P<dollar>(?<![\w$])\$(?:[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$)   # a dollar quote opens
    | \bEXTRACT\((?P<field>[^\s()'"]+)\ FROM\                               # a deparsed EXTRACT
    | (?<![\w$"])(?P<array>\(ARRAY\[)                                          # (ARRAY[ ... ])::T[] ?
    """, re.VERBOSE)

_QUOTED = re.compile(r"'[^']*(?:''[^']*)*'" r'|"[^"]*(?:""[^"]*)*"')
_ARRAY_CAST = re.compile(r"""\)::(?P<type>(?:[^\s\[\](),'"]|\ (?=\w)|"[^"]*(?:""[^"]*)*"|\([\d,]+\))+)\[\]""")
"""What follows the closing bracket of a cast ``ARRAY[...]``: ``)::type[]``, the type as
``format_type`` writes it (``character varying(10)``, ``public."My type"``)."""


def _closing(text: str, start: int, closing: str) -> int:
    """Index of the bracket closing the one just before ``start``, skipping quoted text; -1 if none."""
    depth = 1
    pos = start
    while pos < len(text):
        c = text[pos]
        if c in "'\"":
            m = _QUOTED.match(text, pos)
            if m is None:
                return -1
            pos = m.end()
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth == 0:
                return pos if c == closing else -1
        pos += 1
    return -1


def _elements(body: str) -> list[str]:
    """The top-level comma-separated elements of an ``ARRAY[...]`` body."""
    out: list[str] = []
    depth = 0
    start = pos = 0
    while pos < len(body):
        c = body[pos]
        if c in "'\"":
            m = _QUOTED.match(body, pos)
            pos = m.end() if m else len(body)
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(body[start:pos].strip())
            start = pos + 1
        pos += 1
    out.append(body[start:].strip())
    return out


def _cast_each(body: str, type_: str, fields: bool) -> str:
    """``ARRAY[body]`` cast to ``type_[]`` as PostgreSQL reads it back: each element cast."""
    parts = []
    for e in _elements(body):
        if e.startswith("ARRAY[") and _closing(e, 6, "]") == len(e) - 1:
            parts.append(_cast_each(e[6:-1], type_, fields))
        else:
            parts.append(f"({folded(e, fields)})::{type_}")
    return "ARRAY[" + ", ".join(parts) + "]"


def folded(text: str, fields: bool = True, arrays: bool = True) -> str:
    """``text`` (SQL as PostgreSQL deparses it) with each EXTRACT field in lower case (unless
    not ``fields``) and each ``(ARRAY[...])::T[]`` written ``ARRAY[(...)::T, ...]`` (unless not
    ``arrays``). Pure."""
    if ("EXTRACT(" not in text or not fields) and ("(ARRAY[" not in text or not arrays):
        return text
    out: list[str] = []
    pos = 0
    while True:
        m = _TOKENS.search(text, pos)
        if m is None:
            break
        if m.group("dollar"):
            close = text.find(m.group("dollar"), m.end())
            end = len(text) if close < 0 else close + len(m.group("dollar"))
            out.append(text[pos:end])
            pos = end
            continue
        if m.group("array") and arrays:
            close = _closing(text, m.end(), "]")
            cast = _ARRAY_CAST.match(text, close + 1) if close >= 0 else None
            if cast is None:
                out.append(text[pos:m.end()])
                pos = m.end()
                continue
            out.append(text[pos:m.start()] + _cast_each(text[m.end():close], cast.group("type"), fields))
            pos = cast.end()
            continue
        field = m.group("field")
        if field is not None and fields:
            out.append(text[pos:m.start("field")] + field.lower() + text[m.end("field"):m.end()])
        else:
            out.append(text[pos:m.end()])
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


DEPARSED_FIELDS = frozenset({"definition", "qual", "with_check", "tables"})
"""The inventory fields holding deparsed SQL: index, trigger and constraint definitions,
policy expressions, publication tables with their row filters."""


def comparable(value: Any, fields: bool = True, arrays: bool = True) -> Any:
    """``value`` (deparsed SQL, a list of it, or anything else, kept) :func:`folded`. Pure."""
    if isinstance(value, str):
        return folded(value, fields, arrays)
    if isinstance(value, list):
        return [comparable(v, fields, arrays) for v in value]
    return value


def same_when_folded(a: Mapping[str, Any], b: Mapping[str, Any], fields: bool = True, arrays: bool = True) -> bool:
    """Whether two inventory items are equal once their :data:`DEPARSED_FIELDS` are
    :func:`folded`. Pure."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (k in DEPARSED_FIELDS and comparable(a[k], fields, arrays) == comparable(b[k], fields, arrays))
        for k in a)


def _same(a: Any, b: Any, fields: bool, arrays: bool) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return same_when_folded(a, b, fields, arrays)
    return bool(comparable(a, fields, arrays) == comparable(b, fields, arrays))


def tolerated(pairs: Iterable[tuple[Any, Any]]) -> str:
    """How a check says it passed on pairs (deparsed text, or inventory items) that are equal
    once :func:`folded`: naming only the forms that made them equal. Pure."""
    notes = set()
    for a, b in pairs:
        if _same(a, b, True, False):
            notes.add(_FIELDS_NOTE)
        elif _same(a, b, False, True):
            notes.add(_ARRAYS_NOTE)
        else:
            notes.update((_FIELDS_NOTE, _ARRAYS_NOTE))
    return "what pg_dump does not keep: " + " and ".join(n for n in (_FIELDS_NOTE, _ARRAYS_NOTE) if n in notes)
