"""The evaluate job's tables: the reference study's method table across datasets."""
from __future__ import annotations

from typing import Any, Sequence

from pipeline.core import storage


def study_table(results: list[dict[str, Any]], compare_with: Sequence[str] = ()) -> str:
    """The reference study's table: one row per method, Holidays mAP and UKBench N-S side by side.

    ``compare_with``: JSON outputs of earlier evaluate runs (typically the other dataset).
    """
    rows = list(results)
    for path in compare_with:
        rows.extend(storage.read_json(storage.absolute_uri(path)))
    by_method: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = by_method.setdefault(r["method"], {})
        m[r["dataset"]] = r
    header = (f"{'method':<18} {'Holidays mAP':>12} {'(INRIA)':>9} {'UKBench N-S':>11} "
              f"{'img/s hol':>9} {'img/s ukb':>9} {'dims':>6}")
    lines = [header, "-" * len(header)]
    for method, d in by_method.items():
        h, u = d.get("holidays", {}), d.get("ukbench", {})
        any_r = h or u
        lines.append(
            f"{storage.tag_of(method):<18} "
            f"{_fmt(h.get('map'), 12)} {_fmt(h.get('map_inria_trapezoid'), 9)} {_fmt(u.get('ns_score'), 11)} "
            f"{_fmt(h.get('images_per_second'), 9, '.1f')} {_fmt(u.get('images_per_second'), 9, '.1f')} "
            f"{any_r.get('embedding_dim', '-'):>6}"
        )
    lines.append("Holidays mAP: non-interpolated AP; (INRIA): holidays_map.py's trapezoid. "
                 "img/s: the Spark embed stage, decode included.")
    return "\n".join(lines)


def _fmt(value: Any, width: int, spec: str = ".3f") -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
