"""Background: a call overlapped on a thread gives its value or its error to the caller."""

import threading

import pytest

from backup_tool.errors import DatabaseError
from backup_tool.streams.background import Background


def test_result_is_the_call_value_and_the_call_ran_on_another_thread() -> None:
    seen: list[str] = []

    def work(a: int, b: int) -> int:
        seen.append(threading.current_thread().name)
        return a * b

    job = Background(work, 6, 7, name="side")
    assert job.result() == 42
    assert seen == ["side"]


def test_an_error_is_raised_in_the_caller_and_join_does_not_raise_it() -> None:
    def fail() -> None:
        raise DatabaseError("schema dump failed", "check the server log")

    job = Background(fail)
    job.join()
    with pytest.raises(DatabaseError, match="schema dump failed"):
        job.result()
