"""Connected components, "not duplicates" decisions and the keep policy: the pure oracle, checked by hand."""
import datetime as dt

import pytest

from pipeline.core import grouping as G


def test_components_by_hand():
    pairs = [("b", "c"), ("c", "d"), ("x", "y"), ("a", "d")]
    assert G.connected_components(pairs) == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}
    assert G.connected_components([]) == {}


def _t(day: int) -> dt.datetime:
    return dt.datetime(2020, 1, day, tzinfo=dt.timezone.utc)


def test_keep_policy_pixels_then_lossy_original_then_oldest_then_path():
    c = [
        G.Candidate("small", "/z/small.jpg", 100, 100, 9_000_000, "JPEG", _t(1)),
        G.Candidate("big_png", "/z/big.png", 1000, 800, 900_000, "PNG", _t(1)),
        G.Candidate("big", "/z/big.jpg", 1000, 800, 100_000, "JPEG", _t(3)),
        G.Candidate("big_old", "/z/big_old.jpg", 1000, 800, 100_000, "JPEG", _t(2)),
        G.Candidate("big_old_b", "/a/big_old.jpg", 1000, 800, 100_000, "JPEG", _t(2)),
    ]
    assert G.choose_keeper(c[:2]) == "big_png"  # more pixels beats everything else
    assert G.choose_keeper(c[:3]) == "big"  # same pixels: the JPEG original over its PNG re-encode, though newer
    assert G.choose_keeper(c[:4]) == "big_old"  # same pixels and format: the oldest file
    assert G.choose_keeper(c) == "big_old_b"  # all else equal: first path
    # Unknown dimensions count as zero pixels; an unknown time sorts after known ones.
    assert G.choose_keeper([G.Candidate("u", "/u", None, None, 10**9), c[0]]) == "small"
    assert G.choose_keeper([G.Candidate("t0", "/a", 5, 5, 1), G.Candidate("t1", "/b", 5, 5, 1, None, _t(9))]) == "t1"


def test_keep_policies_largest_oldest_newest():
    c = [
        G.Candidate("hi_res", "/p/a.png", 2000, 2000, 1_000, "PNG", _t(5)),
        G.Candidate("heavy", "/p/b.jpg", 100, 100, 50_000, "JPEG", _t(3)),
        G.Candidate("old", "/p/c.jpg", 100, 100, 10, "JPEG", _t(1)),
        G.Candidate("new", "/p/d.jpg", 100, 100, 10, "JPEG", _t(9)),
    ]
    assert G.choose_keeper(c, "pixels") == "hi_res"
    assert G.choose_keeper(c, "largest") == "heavy"
    assert G.choose_keeper(c, "oldest") == "old"
    assert G.choose_keeper(c, "newest") == "new"
    with pytest.raises(ValueError, match="unknown keep policy"):
        G.choose_keeper(c, "random")


def test_keep_folders_win_first_in_list_order():
    c = [
        G.Candidate("best", "/archive/x/a.jpg", 4000, 3000, 10**7, "JPEG", _t(1)),
        G.Candidate("mine", "/photos/mine/a.jpg", 10, 10, 10, "JPEG", _t(9)),
        G.Candidate("lib", "/photos/library/a.jpg", 20, 20, 10, "JPEG", _t(9)),
    ]
    assert G.choose_keeper(c, "pixels", ["/photos/library"]) == "lib"
    assert G.choose_keeper(c, "pixels", ["/photos/mine", "/photos/library"]) == "mine"
    assert G.choose_keeper(c, "pixels", ["/photos/library/", "/photos/mine"]) == "lib"  # trailing slash is fine
    # A folder name that is only a prefix of another folder does not match it.
    assert G.folder_rank("/photos/mine2/a.jpg", ["/photos/mine"]) == 1


def test_cannot_link_drops_declared_edge_and_cuts_weakest_chain_link():
    edges = [("a", "b", 0.99), ("b", "c", 0.90), ("c", "d", 0.97), ("x", "y", 0.95)]
    assert G.components_with_cannot_link(edges, []) == G.connected_components([e[:2] for e in edges])
    # The declared pair's own edge goes; x and y become singletons and leave the groups.
    assert G.components_with_cannot_link(edges, [("y", "x")]) == {"a": "a", "b": "a", "c": "a", "d": "a"}
    # a and d are joined only through the chain a-b-c-d: the weakest link (b-c) is cut.
    got = G.components_with_cannot_link(edges, [("a", "d")])
    assert got == {"a": "a", "b": "a", "c": "c", "d": "c", "x": "x", "y": "x"}
    # No declared pair ever shares a group, whatever the graph.
    import random

    rng = random.Random(5)
    nodes = [f"n{i:02d}" for i in range(30)]
    for _ in range(20):
        e = [(*rng.sample(nodes, 2), rng.random()) for _ in range(40)]
        banned = [tuple(rng.sample(nodes, 2)) for _ in range(4)]
        labels = G.components_with_cannot_link(e, banned)
        assert all(labels.get(a) is None or labels.get(a) != labels.get(b) for a, b in banned)
        # Only declared pairs are separated: every kept group is a union of original edges' nodes.
        full = G.connected_components([x[:2] for x in e])
        assert all(full[n] == full[min(m for m in labels if labels[m] == labels[n])] for n in labels)
