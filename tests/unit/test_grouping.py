"""Connected components and the keep policy: the pure oracle, checked by hand."""
from pipeline.core import grouping as G


def test_components_by_hand():
    pairs = [("b", "c"), ("c", "d"), ("x", "y"), ("a", "d")]
    assert G.connected_components(pairs) == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}
    assert G.connected_components([]) == {}


def test_keep_policy_pixels_then_bytes_then_path():
    c = [
        G.Candidate("small", "/z/small.jpg", 100, 100, 9_000_000),
        G.Candidate("big", "/z/big.jpg", 1000, 800, 100_000),
        G.Candidate("big_png", "/z/big.png", 1000, 800, 900_000),
        G.Candidate("big_png_b", "/a/big.png", 1000, 800, 900_000),
    ]
    assert G.choose_keeper(c) == "big_png_b"  # same pixels and bytes: first path
    assert G.choose_keeper(c[:3]) == "big_png"  # same pixels: larger file
    assert G.choose_keeper(c[:2]) == "big"  # more pixels beats a larger file
    # Unknown dimensions count as zero pixels.
    assert G.choose_keeper([G.Candidate("u", "/u", None, None, 10**9), c[0]]) == "small"
