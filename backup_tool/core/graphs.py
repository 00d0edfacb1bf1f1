"""Graph arithmetic shared by the planners (pure, standard library only)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

N = TypeVar("N", bound=Hashable)


def reachable(seeds: Iterable[N], successors: Mapping[N, Sequence[N]]) -> set[N]:
    """``seeds`` and every node reachable from them through ``successors`` (cycles allowed)."""
    found = set(seeds)
    todo = list(found)
    while todo:
        for nxt in successors.get(todo.pop(), ()):
            if nxt not in found:
                found.add(nxt)
                todo.append(nxt)
    return found
