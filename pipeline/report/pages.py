"""Report pages: groups shaped, ordered and paginated (pure), rendered with jinja2.

Every value from the archive (paths, error messages) reaches HTML only through jinja2's
autoescaping; no markup is built by hand. Each page holds a bounded number of groups, so a
report of 100k groups is many small pages rather than one page no browser can open.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import jinja2

ORDERS = {
    "size": "largest groups first",
    "doubt": "most doubtful first (lowest duplicate probability)",
}
FAILED_PER_PAGE = 500
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


@dataclass
class Member:
    image_id: str
    path: str
    width: int | None
    height: int | None
    size_bytes: int
    format: str | None
    keep: bool
    similarity: float | None  # to the kept image; 1.0 for the kept image itself
    # "pair": the pair's similarity from the search; "embedding": no direct pair (joined through
    # other images), cosine of the two embeddings; None: unknown.
    similarity_source: str | None
    # Calibrated probability that it duplicates the kept image (its pair with it, or, joined
    # through others, its strongest pair in the group); None with dedup.score=cosine.
    score: float | None = None
    thumb: str | None = None  # relative URL of the thumbnail, None when it could not be made
    shown_path: str | None = None  # the path relative to the archive root (the full one is a tooltip)


@dataclass
class Group:
    group_id: str
    members: list[Member] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def min_similarity(self) -> float:
        sims = [m.similarity for m in self.members if not m.keep]
        known = [s for s in sims if s is not None]
        return min(known) if known else -1.0  # unknown similarity: the most doubtful

    @property
    def min_score(self) -> float | None:
        """The weakest member's duplicate probability; None when the pairs carry no score."""
        scores = [m.score for m in self.members if not m.keep]
        if not any(s is not None for s in scores):
            return None
        return min(s if s is not None else -1.0 for s in scores)

    @property
    def doubt(self) -> float:
        """What "most doubtful first" sorts by: the calibrated score when there is one, as it
        means the same in dense and sparse parts of the collection; else the cosine."""
        score = self.min_score
        return score if score is not None else self.min_similarity

    @property
    def bytes_freed(self) -> int:
        return sum(m.size_bytes for m in self.members if not m.keep)


def build_groups(rows: Iterable[dict[str, Any]]) -> list[Group]:
    """Rows of (group_id, image_id, keep, path, ...) -> groups, kept image first, then most similar."""
    groups: dict[str, Group] = {}
    for r in rows:
        g = groups.setdefault(r["group_id"], Group(r["group_id"]))
        g.members.append(Member(**{k: r.get(k) for k in Member.__dataclass_fields__
                                   if k not in ("thumb", "shown_path")}))
    for g in groups.values():
        g.members.sort(key=lambda m: (not m.keep, -(m.similarity if m.similarity is not None else -2.0), m.path))
    return list(groups.values())


def archive_root(paths: Sequence[str]) -> str:
    """The deepest folder holding every path ("" when they share none, e.g. different URIs)."""
    absolute = [p for p in paths if p.startswith("/")]
    if not absolute or len(absolute) != len(paths):
        return ""
    root = os.path.commonpath(absolute)
    return root if root not in absolute else os.path.dirname(root)


def shorten_paths(groups: Sequence[Group]) -> str:
    """Set each member's ``shown_path`` relative to the archive root; returns that root."""
    root = archive_root([m.path for g in groups for m in g.members])
    for g in groups:
        for m in g.members:
            m.shown_path = os.path.relpath(m.path, root) if root else m.path
    return root


def order_groups(groups: Sequence[Group], order: str) -> list[Group]:
    if order == "size":
        return sorted(groups, key=lambda g: (-g.size, g.doubt, g.group_id))
    if order == "doubt":
        return sorted(groups, key=lambda g: (g.doubt, g.min_similarity, -g.size, g.group_id))
    raise ValueError(f"unknown order {order!r}; one of {', '.join(ORDERS)}")


def page_count(n_items: int, per_page: int) -> int:
    return max(1, math.ceil(n_items / per_page))


def group_page_name(order: str, page: int) -> str:
    return f"groups-{order}-{page:04d}.html"


def failed_page_name(page: int) -> str:
    return f"failed-{page:04d}.html"


def pager(page: int, pages: int, name_of, window: int = 3) -> dict[str, Any]:
    """Links for first / previous / nearby pages / next / last (bounded, whatever the page count)."""
    around = range(max(1, page - window), min(pages, page + window) + 1)
    return {
        "page": page, "pages": pages,
        "first": name_of(1) if page > 1 else None,
        "prev": name_of(page - 1) if page > 1 else None,
        "next": name_of(page + 1) if page < pages else None,
        "last": name_of(pages) if page < pages else None,
        "around": [(p, name_of(p)) for p in around],
    }


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["bytes"] = human_bytes
    env.filters["sim"] = lambda s: "?" if s is None else f"{s:.3f}"
    return env


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def render_site(out_dir: str, summary: dict[str, Any], groups: Sequence[Group], failed: Sequence[dict[str, Any]],
                per_page: int) -> dict[str, int]:
    """Write index.html, the group pages of every order, the failed-file pages and style.css."""
    env = environment()
    common = {"title": summary["title"], "orders": ORDERS, "root": summary.get("root", ""),
              "failed_first": failed_page_name(1), "group_first": {o: group_page_name(o, 1) for o in ORDERS}}
    shutil.copyfile(os.path.join(TEMPLATES, "style.css"), os.path.join(out_dir, "style.css"))
    _write(os.path.join(out_dir, "index.html"), env.get_template("summary.html").render(**common, s=summary))

    pages = page_count(len(groups), per_page)
    group_tpl = env.get_template("groups.html")
    for order in ORDERS:
        ordered = order_groups(groups, order)
        for page in range(1, pages + 1):
            chunk = ordered[(page - 1) * per_page: page * per_page]
            _write(os.path.join(out_dir, group_page_name(order, page)), group_tpl.render(
                **common, order=order, groups=chunk, first_rank=(page - 1) * per_page + 1,
                total_groups=len(groups), pager=pager(page, pages, lambda p, o=order: group_page_name(o, p)),
                other_orders={o: group_page_name(o, 1) for o in ORDERS if o != order}))

    failed_pages = page_count(len(failed), FAILED_PER_PAGE)
    failed_tpl = env.get_template("failed.html")
    for page in range(1, failed_pages + 1):
        rows = failed[(page - 1) * FAILED_PER_PAGE: page * FAILED_PER_PAGE]
        _write(os.path.join(out_dir, failed_page_name(page)), failed_tpl.render(
            **common, rows=rows, total=len(failed), pager=pager(page, failed_pages, failed_page_name)))
    return {"group_pages": pages * len(ORDERS), "failed_pages": failed_pages}
