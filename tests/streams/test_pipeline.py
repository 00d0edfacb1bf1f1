"""What a failed client tool's error message keeps."""

from __future__ import annotations

import pytest

from backup_tool.errors import DatabaseError
from backup_tool.streams.pipeline import Process, failure_line


def test_parallel_pg_restore_names_the_cause_not_the_worker_death() -> None:
    stderr = (b"pg_restore: error: could not execute query: ERROR:  constraint \"fk\" does not exist\n"
              b"Command was: COMMENT ON CONSTRAINT fk ON public.child IS 'x';\n"
              b"pg_restore: error: a worker process died unexpectedly\n")
    assert failure_line(stderr) == ("pg_restore: error: could not execute query: ERROR:  "
                                    "constraint \"fk\" does not exist")


def test_a_lone_consequence_or_plain_output_is_still_reported() -> None:
    assert failure_line(b"pg_restore: error: a worker process died unexpectedly\n") == \
        "pg_restore: error: a worker process died unexpectedly"
    assert failure_line(b"first\nsecond\n") == "second"
    assert failure_line(b"") == "no error output"


def test_a_failing_child_raises_with_its_cause() -> None:
    script = "echo 'tool: error: the real cause' >&2; echo 'tool: error: a worker process died unexpectedly' >&2; exit 1"
    proc = Process(["sh", "-c", script], {}, "the tool")
    with pytest.raises(DatabaseError, match="the tool failed: tool: error: the real cause"):
        for _ in proc.chunks():
            pass
        proc.finish()
