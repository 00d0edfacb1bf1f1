"""reachable: the closure the post-data planner and the partial lay-out both take."""

from backup_tool.core.graphs import reachable


def test_closure_follows_every_path_once_and_survives_cycles() -> None:
    edges = {1: [2, 3], 2: [4], 3: [4, 1], 4: [], 5: [6]}
    assert reachable([1], edges) == {1, 2, 3, 4}
    assert reachable([5, 4], edges) == {4, 5, 6}


def test_no_seeds_reach_nothing_and_unknown_nodes_are_kept() -> None:
    assert reachable([], {1: [2]}) == set()
    assert reachable(["x"], {}) == {"x"}
