"""The target session a table restore opens ahead (logical/session_ahead.py): a DSN that does
not parse, or a server that cannot be reached, is reported where the restore connects, with
the error it always gave."""

from __future__ import annotations

import pytest
from support.clusters import free_port

from backup_tool.errors import DatabaseError
from backup_tool.logical.session_ahead import open_session_ahead
from backup_tool.postgres.connection import ConnInfo


def test_a_dsn_that_does_not_parse_opens_nothing() -> None:
    assert open_session_ahead("not a dsn = =") is None


def test_an_unreachable_server_is_reported_when_the_session_is_taken() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=nobody dbname=nowhere connect_timeout=5"
    session = open_session_ahead(dsn)
    assert session is not None
    with pytest.raises(DatabaseError) as ahead:
        session.take("UTF8")
    with pytest.raises(DatabaseError) as direct:
        ConnInfo(dsn).connect(settings={"client_encoding": "UTF8"})
    assert (ahead.value.message, ahead.value.hint) == (direct.value.message, direct.value.hint)

