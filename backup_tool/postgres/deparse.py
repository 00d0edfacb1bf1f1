"""What PostgreSQL's deparser writes in a form that reads back differently, and the one
comparison that tolerates it.

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
"""

from __future__ import annotations

import re
from typing import Any, Mapping

TOLERATED = ("the letter case of EXTRACT fields, which pg_dump does not keep "
             "(EXTRACT('YEAR' FROM x) reads back as EXTRACT(year FROM x), the same)")
"""How a check says it compared deparsed text with :func:`folded`."""

_TOKENS = re.compile(r"""
      '[^']*(?:''[^']*)*'                       # a string literal ('' inside)
    | "[^"]*(?:""[^"]*)*"                       # a quoted identifier
    | (?P<dollar>(?<![\w$])\$(?:[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$)   # a dollar quote opens
    | \bEXTRACT\((?P<field>[^\s()'"]+)\ FROM\                               # a deparsed EXTRACT
    """, re.VERBOSE)


def folded(text: str) -> str:
    """``text`` (SQL as PostgreSQL deparses it) with each EXTRACT field in lower case. Pure."""
    if "EXTRACT(" not in text:
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
        field = m.group("field")
        if field is not None:
            out.append(text[pos:m.start("field")] + field.lower() + text[m.end("field"):m.end()])
        else:
            out.append(text[pos:m.end()])
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


DEPARSED_FIELDS = frozenset({"definition", "qual", "with_check", "tables"})
"""The inventory fields holding deparsed SQL: index, trigger and constraint definitions,
policy expressions, publication tables with their row filters."""


def comparable(value: Any) -> Any:
    """``value`` (deparsed SQL, a list of it, or anything else, kept) :func:`folded`. Pure."""
    if isinstance(value, str):
        return folded(value)
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def same_when_folded(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two inventory items are equal once the EXTRACT fields of their
    :data:`DEPARSED_FIELDS` are :func:`folded`. Pure."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (k in DEPARSED_FIELDS and comparable(a[k]) == comparable(b[k])) for k in a)
