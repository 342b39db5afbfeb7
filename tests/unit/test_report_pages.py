"""Report pages without Spark: group shaping, the two orders, bounded pagination, escaping."""
from __future__ import annotations

import os
import re

from pipeline.report import pages as P


def _rows(n_groups: int):
    rows = []
    for g in range(n_groups):
        size = 2 + g % 4
        for i in range(size):
            rows.append({"group_id": f"g{g:05d}", "image_id": f"g{g:05d}-{i}", "keep": i == 0,
                         "path": f"/archive/set{g % 7}/img{g}_{i}.jpg", "width": 640, "height": 480,
                         "size_bytes": 1000 + i, "format": "JPEG",
                         "similarity": 1.0 if i == 0 else 0.99 - (g % 50) / 100 - i / 1000,
                         "similarity_source": "pair"})
    return rows


def test_groups_kept_first_and_both_orders():
    groups = P.build_groups(_rows(30))
    assert all(g.members[0].keep and not any(m.keep for m in g.members[1:]) for g in groups)
    by_size = P.order_groups(groups, "size")
    assert [g.size for g in by_size] == sorted((g.size for g in groups), reverse=True)
    by_doubt = P.order_groups(groups, "doubt")
    assert [g.min_similarity for g in by_doubt] == sorted(g.min_similarity for g in groups)
    assert groups[0].bytes_freed == sum(m.size_bytes for m in groups[0].members[1:])
    # A group whose similarities are unknown is the most doubtful of all.
    unknown = P.build_groups([{**r, "similarity": None if not r["keep"] else 1.0} for r in _rows(1)])
    assert unknown[0].min_similarity == -1.0


def test_pager_is_bounded_whatever_the_page_count():
    p = P.pager(500, 2000, lambda n: f"p{n}")
    assert (p["first"], p["prev"], p["next"], p["last"]) == ("p1", "p499", "p501", "p2000")
    assert [n for n, _ in p["around"]] == list(range(497, 504))
    assert P.pager(1, 1, str)["next"] is None and P.page_count(0, 50) == 1 and P.page_count(101, 50) == 3


def test_render_site_pages_bounded_and_escaped(tmp_path):
    rows = _rows(1000)
    rows[0]["path"] = "/archive/<script>alert(1)</script>.jpg"
    groups = P.build_groups(rows)
    P.shorten_paths(groups)
    summary = {"title": "t", "root": "/archive", "workdir": "w", "method": "m", "generated": "now",
               "files_total": 1, "by_status": {"ok": 1, "error": 0, "skipped": 0}, "top_errors": [],
               "top_skipped": [("not an image file (<b>)", 3)], "groups": len(groups), "images_in_groups": 1,
               "images_to_remove": 1, "bytes_freed": 1, "pairs": 1, "threshold": 0.9, "histogram": None,
               "histogram_note": "", "failed_total": 1, "mlflow_run": None, "tracking_uri": "sqlite:///x",
               "settings": [], "all_params": []}
    failed = [{"status": "error", "path": "/archive/<i>x</i>", "error": "truncated <b>", "format": None,
               "size_bytes": 3}] * 1200
    out = P.render_site(str(tmp_path), summary, groups, failed, per_page=50)
    assert out == {"group_pages": 40, "failed_pages": 3}
    files = sorted(os.listdir(tmp_path))
    assert "groups-size-0020.html" in files and "groups-doubt-0020.html" in files and "failed-0003.html" in files
    sizes = [os.path.getsize(tmp_path / f) for f in files if f.startswith("groups-")]
    assert max(sizes) < 120_000  # 50 groups a page: small whatever the number of groups
    text = "".join((tmp_path / f).read_text(encoding="utf-8") for f in files if f.endswith(".html"))
    assert "<script>" not in text and "<b>" not in text and "<i>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in text and "not an image file (&lt;b&gt;)" in text
    first = (tmp_path / "groups-size-0001.html").read_text(encoding="utf-8")
    assert len(re.findall(r'<section class="group"', first)) == 50
    assert 'href="groups-size-0002.html"' in first and 'href="groups-doubt-0001.html"' in first


def test_report_never_replaces_a_folder_it_did_not_write(tmp_path):
    import pytest

    from pipeline.config import Config, ConfigError
    from pipeline.report.build import build_report

    precious = tmp_path / "Documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    config = Config.load(None, [f"workdir={tmp_path / 'work'}"])
    with pytest.raises(ConfigError, match="holds other files"):
        build_report(None, config, str(precious))  # refused before any Spark work
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_doubtful_first_follows_the_calibrated_score():
    """Issue 11: with calibrated scores the doubt order is theirs, not the raw cosine's (a crowded
    neighbourhood makes a high cosine doubtful)."""
    rows = []
    for g, (sim, score) in enumerate([(0.95, 0.20), (0.90, 0.99), (0.93, 0.60)]):
        rows += [{"group_id": f"g{g}", "image_id": f"g{g}-0", "keep": True, "path": f"/a/{g}-0.jpg", "width": 1,
                  "height": 1, "size_bytes": 1, "format": "JPEG", "similarity": 1.0, "similarity_source": "pair"},
                 {"group_id": f"g{g}", "image_id": f"g{g}-1", "keep": False, "path": f"/a/{g}-1.jpg", "width": 1,
                  "height": 1, "size_bytes": 1, "format": "JPEG", "similarity": sim, "similarity_source": "pair",
                  "score": score}]
    groups = P.build_groups(rows)
    assert [g.group_id for g in P.order_groups(groups, "doubt")] == ["g0", "g2", "g1"]
    assert [g.min_score for g in groups] == [0.20, 0.99, 0.60]
    # Without scores (dedup.score=cosine) the order is the cosine's, as before.
    plain = P.build_groups([{k: v for k, v in r.items() if k != "score"} for r in rows])
    assert [g.min_score for g in plain] == [None, None, None]
    assert [g.group_id for g in P.order_groups(plain, "doubt")] == ["g1", "g2", "g0"]
