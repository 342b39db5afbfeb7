"""``neardup apply``: the keep decisions of a workdir as file actions (dry run by default).

Reads the groups, image and pairs tables straight from Parquet (no Spark: a plan of a
million rows takes seconds), writes the plan CSV, and with ``--execute`` carries it out
through :mod:`pipeline.core.actions` (journaled, undoable, never deleting).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field

from pipeline import schemas as S
from pipeline.config import Config, ConfigError
from pipeline.core import actions, storage
from pipeline.stages.ingest import image_id_for

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    mode: str
    executed: bool
    planned: int
    planned_bytes: int
    plan_csv: str | None = None
    journal: str | None = None
    done: int = 0
    done_bytes: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    report: str = ""  # the lines the CLI prints


def os_path(stored: str, image_id: str) -> str | None:
    """The filesystem path of an image-table path, checked against its image id.

    The table holds names that are not UTF-8 with ``\\xNN`` escapes (Spark strings must be
    UTF-8); the id is a hash of the original bytes, so the original name can be recovered
    and verified. None when neither reading matches (the row is then refused).
    """
    if image_id_for(stored) == image_id:
        return stored
    if "\\x" in stored:
        try:
            raw = stored.encode("utf-8", "surrogateescape").decode("unicode_escape").encode("latin-1")
        except (UnicodeError, ValueError):
            return None
        candidate = os.fsdecode(raw)
        if image_id_for(candidate) == image_id:
            return candidate
    return None


def _read(uri: str, columns: list[str], what: str):
    import pyarrow.parquet as pq

    local = storage.local_path_of(uri)
    if local is None or not os.path.exists(os.path.join(local, "_SUCCESS")):
        raise FileNotFoundError(f"the {what} at {uri} does not exist or was not completely written; "
                                "run `neardup run` (or dedup) first")
    return pq.read_table(local, columns=columns).to_pylist()


def plan(config: Config) -> tuple[list[actions.Action], str, int]:
    """The actions (one per image proposed for removal), the archive root, unresolvable rows."""
    wd = storage.Workdir.of(config.workdir)
    method = config.embed.backbone
    groups = _read(wd.groups(method), [S.GROUP_ID, S.IMAGE_ID, S.KEEP], "groups table")
    members = {g[S.IMAGE_ID] for g in groups}
    images = {r[S.IMAGE_ID]: r for r in _read(wd.images, [S.IMAGE_ID, S.PATH, S.SIZE_BYTES, S.CONTENT_SHA256],
                                                 "image table") if r[S.IMAGE_ID] in members}
    sims = {(p[S.IMAGE_ID_A], p[S.IMAGE_ID_B]): p[S.SIMILARITY]
            for p in _read(wd.pairs(method), [S.IMAGE_ID_A, S.IMAGE_ID_B, S.SIMILARITY], "pairs table")}
    kept = {g[S.GROUP_ID]: g[S.IMAGE_ID] for g in groups if g[S.KEEP]}
    paths = {i: os_path(r[S.PATH], i) for i, r in images.items()}
    out, unresolved = [], 0
    for g in sorted(groups, key=lambda g: (g[S.GROUP_ID], images[g[S.IMAGE_ID]][S.PATH])):
        if g[S.KEEP]:
            continue
        dup, keep = g[S.IMAGE_ID], kept[g[S.GROUP_ID]]
        if paths[dup] is None or paths[keep] is None:
            unresolved += 1
            continue
        d, k = images[dup], images[keep]
        out.append(actions.Action(path=paths[dup], kept_path=paths[keep], group=g[S.GROUP_ID],
                                  similarity=sims.get((min(dup, keep), max(dup, keep))),
                                  size_bytes=d[S.SIZE_BYTES], sha256=d[S.CONTENT_SHA256],
                                  kept_size_bytes=k[S.SIZE_BYTES], kept_sha256=k[S.CONTENT_SHA256]))
    all_paths = [p for p in paths.values() if p is not None]
    root = os.path.commonpath(all_paths) if all_paths else os.sep
    if all_paths and os.path.isfile(root):
        root = os.path.dirname(root)
    return out, root, unresolved


def apply(config: Config) -> ApplyResult:
    """Plan (always) and, with ``apply.execute``, act; ``apply.undo`` rolls a journal back instead.

    Nothing is printed: ``result.report`` holds the text for people (the CLI prints it).
    """
    a = config.apply
    if a.undo:
        outcome = actions.undo(a.undo)
        lines = [f"restored {outcome.done} files from {a.undo}", *_refused_lines(outcome)]
        return ApplyResult(mode="undo", executed=True, planned=outcome.done, planned_bytes=0, journal=a.undo,
                           done=outcome.done, refused=outcome.refused, report="\n".join(lines))
    if a.execute and a.mode == "report":
        raise ConfigError("apply.mode report only writes the plan; choose move, hardlink or symlink to --execute")
    if a.execute and not a.target:
        raise ConfigError(f"apply --mode {a.mode} --execute needs --target DIR (the quarantine folder; "
                          "hardlink and symlink keep each replaced file's original there)")
    todo, root, unresolved = plan(config)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    folder = os.path.abspath(a.target) if a.target else os.path.join(
        storage.local_path_of(storage.Workdir.of(config.workdir).root), "apply")
    plan_csv = os.path.join(folder, f"plan-{stamp}.csv")
    actions.write_plan(todo, a.mode, plan_csv)
    planned_bytes = sum(x.size_bytes for x in todo)
    result = ApplyResult(mode=a.mode, executed=bool(a.execute), planned=len(todo), planned_bytes=planned_bytes,
                         plan_csv=plan_csv, refused={"path not recoverable": unresolved} if unresolved else {})
    # repr(): names from the archive are shown as data, control characters escaped.
    lines = [f"  {a.mode:8} {x.path!r}  (kept: {x.kept_path!r}, similarity "
             f"{'?' if x.similarity is None else f'{x.similarity:.3f}'})" for x in todo[:20]]
    if len(todo) > 20:
        lines.append(f"  ... and {len(todo) - 20} more")
    lines.append(f"plan: {len(todo)} files, {planned_bytes} bytes -> {plan_csv}")
    if not a.execute:
        lines.append("dry run: nothing changed (add --execute to act)")
        result.report = "\n".join(lines)
        return result
    if _inside(os.path.abspath(a.target), root):
        log.warning("the quarantine folder %s is inside the archive %s: a later ingest will list it", a.target, root)
    result.journal = os.path.join(folder, f"journal-{stamp}.jsonl")
    journal = actions.Journal(result.journal)
    try:
        outcome = actions.execute(todo, a.mode, root, os.path.abspath(a.target), journal)
    finally:
        journal.close()
    result.done, result.done_bytes = outcome.done, outcome.bytes
    result.refused.update(outcome.refused)
    lines.append(f"{a.mode}: {outcome.done} files ({outcome.bytes} bytes); journal {result.journal} "
                 f"(undo: neardup apply --undo {result.journal})")
    result.report = "\n".join(lines + _refused_lines(outcome))
    return result


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _refused_lines(outcome: actions.Outcome) -> list[str]:
    lines = [f"  refused {n}: {reason}" for reason, n in sorted(outcome.refused.items())]
    return lines + [f"    {path!r}: {reason}" for path, reason in outcome.refused_paths[:10]]
