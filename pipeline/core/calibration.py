"""Pair scores that mean the same on every collection: neighbourhood normalisation + calibration.

A raw cosine of 0.9 is a near-certain duplicate among objects on plain backgrounds and a
coin toss among holiday photos of beaches: in dense regions of the embedding space
unrelated images are close too. As in copy detection (SSCD's score normalisation), each
image's similarity to its ``rank``-th neighbour (its "level": how crowded its
neighbourhood is) is subtracted, at both ends of a pair, so a pair must stand out from
both neighbourhoods. A logistic model of (cosine, normalised score) fitted on labelled
pairs turns that into the probability that the pair is a duplicate; ``dedup.threshold``
is a bound on it, i.e. on the expected precision of the pairs kept.

Everything here is pure numpy (scikit-learn only to fit): :mod:`pipeline.stages.dedup`
computes the same features in Spark from the kNN lists and applies the same formula
(:meth:`Calibration.spark_terms`), and the tests check the two against each other.
The artifact is a ``.npz`` without pickle whose version is the hash of its content, like
the centring (:mod:`pipeline.core.whitening`). A default fitted by ``make calibrate``
(``bench/calibrate.py``) ships inside the package, so it works without ../shared.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

# The shipped artifacts, one per similarity scale ("raw": no embed.postprocess; "centred": a
# centring/whitening learned on another collection; "_nodba": database-side augmentation off,
# which lowers the cosines of near-duplicates). The file name carries the version. The top level
# holds those fitted for the default backbone; another backbone's, where one ships, lie in a
# folder named after it (a network's cosines have their own scale: MobileNetV2 0.35's make
# different probabilities from MobileNet's at the same cosine).
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration_models")
DEFAULT_BACKBONE = "mobilenet"
SPACES = ("raw", "centred", "raw_nodba", "centred_nodba")
FEATURES = ("cosine", "normalised")


def neighbour_levels(query_ids: np.ndarray, neighbor_ids: np.ndarray, ranks: np.ndarray, sims: np.ndarray,
                     rank: int) -> dict[Any, float]:
    """Each query's similarity to its ``rank``-th other neighbour (self excluded).

    A query with fewer than ``rank`` other neighbours (a small collection) takes its last,
    least similar one; one with none gets -1 (nothing to stand out from).
    """
    query_ids, neighbor_ids = np.asarray(query_ids), np.asarray(neighbor_ids)
    ranks, sims = np.asarray(ranks), np.asarray(sims, dtype=np.float64)
    others = query_ids != neighbor_ids
    order = np.lexsort((ranks[others], query_ids[others]))
    q, s = query_ids[others][order], sims[others][order]
    levels: dict[Any, float] = {}
    if len(q):
        starts = np.r_[0, np.flatnonzero(q[1:] != q[:-1]) + 1]
        ends = np.r_[starts[1:], len(q)]
        for start, end in zip(starts, ends):
            levels[q[start]] = float(s[min(start + rank - 1, end - 1)])
    for image in np.unique(query_ids):
        levels.setdefault(image, -1.0)
    return levels


def candidate_pairs(query_ids: np.ndarray, neighbor_ids: np.ndarray,
                    sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unordered pairs (a < b) of the kNN rows, sorted, each with its best similarity (in the
    rows' dtype); no self pairs."""
    import pandas as pd

    q, n, s = np.asarray(query_ids, object), np.asarray(neighbor_ids, object), np.asarray(sims)
    keep = q != n
    q, n, s = q[keep], n[keep], s[keep]
    first = q < n
    frame = pd.DataFrame({"a": np.where(first, q, n), "b": np.where(first, n, q), "s": s})
    best = frame.groupby(["a", "b"], sort=True, as_index=False)["s"].max()
    return best.a.to_numpy(), best.b.to_numpy(), best.s.to_numpy()


def features(cosine: np.ndarray, level_a: np.ndarray, level_b: np.ndarray,
             level_cap: float | None = None) -> dict[str, np.ndarray]:
    """The model's inputs: the cosine and the cosine less the higher of the two levels.

    ``level_cap``: a level above it is taken as the cap. A 10th neighbour that close is not a
    crowded region of unrelated images but a large group of copies (a burst, the demo's 11
    variants of a photo), which must not count against its own members.
    """
    cosine = np.asarray(cosine, dtype=np.float64)
    level = np.maximum(np.asarray(level_a, np.float64), np.asarray(level_b, np.float64))
    if level_cap is not None:
        level = np.minimum(level, level_cap)
    return {"cosine": cosine, "normalised": cosine - level}


def pair_table(query_ids, neighbor_ids, ranks, sims, rank: int):
    """kNN rows -> (pairs list, cosine, level_a, level_b): everything a calibration needs."""
    levels = neighbour_levels(query_ids, neighbor_ids, ranks, sims, rank)
    a, b, cos = candidate_pairs(query_ids, neighbor_ids, np.asarray(sims, np.float64))
    keys = list(zip(a.tolist(), b.tolist()))
    la = np.array([levels[x] for x in a.tolist()], np.float64)
    lb = np.array([levels[y] for y in b.tolist()], np.float64)
    return keys, cos, la, lb


@dataclass(frozen=True)
class Calibration:
    """``p = 1 / (1 + exp(-(intercept + sum coef_f * feature_f)))`` over :data:`FEATURES`."""

    rank: int
    coef: tuple[float, ...]
    intercept: float
    space: str
    params: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    level_cap: float | None = None

    def logit(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        z = np.full(np.shape(feats[FEATURES[0]]), self.intercept, np.float64)
        for name, c in zip(FEATURES, self.coef):
            z = z + c * np.asarray(feats[name], np.float64)
        return z

    def probability(self, cosine, level_a, level_b) -> np.ndarray:
        """Calibrated probability that each pair is a duplicate."""
        return 1.0 / (1.0 + np.exp(-self.logit(features(cosine, level_a, level_b, self.level_cap))))

    def spark_terms(self) -> dict[str, float]:
        """The formula's numbers, for the Spark twin in :mod:`pipeline.stages.dedup`."""
        return {"intercept": float(self.intercept), **{n: float(c) for n, c in zip(FEATURES, self.coef)},
                "level_cap": None if self.level_cap is None else float(self.level_cap)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (``.npz``, metadata as JSON; no pickle)."""
        path = os.fspath(path)
        meta = json.dumps(self._meta(), sort_keys=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, metadata=np.array(meta))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _meta(self) -> dict[str, Any]:
        return {"rank": self.rank, "coef": list(self.coef), "intercept": self.intercept, "space": self.space,
                "features": list(FEATURES), "params": self.params, "version": self.version,
                "level_cap": self.level_cap}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Calibration":
        """Read an artifact written by :meth:`save`; refuses pickles and a mismatched version."""
        with np.load(os.fspath(path), allow_pickle=False) as npz:
            meta = json.loads(str(npz["metadata"]))
        if meta.get("features") != list(FEATURES):
            raise ValueError(f"{path}: features {meta.get('features')} differ from {list(FEATURES)}")
        cap = meta.get("level_cap")
        cal = cls(int(meta["rank"]), tuple(float(c) for c in meta["coef"]), float(meta["intercept"]),
                  meta["space"], meta.get("params", {}), "", None if cap is None else float(cap))
        version = _hash(cal)
        if version != meta["version"]:
            raise ValueError(f"{path}: content hash {version} does not match stored version {meta['version']}")
        return replace(cal, version=version)


def _hash(cal: Calibration) -> str:
    content = {"rank": cal.rank, "coef": [round(c, 12) for c in cal.coef],
               "intercept": round(cal.intercept, 12), "space": cal.space, "params": cal.params}
    if cal.level_cap is not None:
        content["level_cap"] = round(cal.level_cap, 12)
    body = json.dumps(content, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def fit(cosine, level_a, level_b, labels, rank: int, space: str, params: Mapping[str, Any] | None = None,
        C: float = 1.0, class_weight: str | None = "balanced", level_cap: float | None = None) -> Calibration:
    """Logistic regression of the duplicate label on :func:`features` (scikit-learn).

    ``class_weight="balanced"``: duplicates and other pairs weigh the same, so the model does
    not learn the training collections' share of duplicates among candidates (it varies from
    collection to collection: 14% of UKBench's candidates, 8% of Holidays')."""
    from sklearn.linear_model import LogisticRegression

    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    feats = features(cosine, level_a, level_b, level_cap)
    X = np.column_stack([feats[n] for n in FEATURES])
    y = np.asarray(labels, dtype=int)
    if len(set(y.tolist())) < 2:
        raise ValueError("calibration needs both duplicate and non-duplicate pairs")
    model = LogisticRegression(C=C, class_weight=class_weight, max_iter=1000).fit(X, y)
    cal = Calibration(rank, tuple(float(c) for c in model.coef_[0]), float(model.intercept_[0]), space,
                      dict(params or {}), "", level_cap)
    return replace(cal, version=_hash(cal))


def artifact_name(cal: Calibration) -> str:
    return f"calibration-{cal.space}-{cal.version}.npz"


def space_of(centred: bool, dba: bool) -> str:
    """Which shipped calibration fits the similarities: centring and DBA change their scale."""
    return ("centred" if centred else "raw") + ("" if dba else "_nodba")


def level_of_row(sims: np.ndarray, rank: int) -> float:
    """The level of an image from its other neighbours' similarities, best first
    (fewer than ``rank``: the last; none: -1), as :func:`neighbour_levels` reads it."""
    return float(sims[min(rank, len(sims)) - 1]) if len(sims) else -1.0


def shipped_dir(backbone: str = DEFAULT_BACKBONE) -> str:
    """Where the artifacts fitted for ``backbone`` ship (``bench/calibrate.py --write`` with that
    backbone writes there); a path to a model file is no folder name and gets the top level."""
    named = backbone != DEFAULT_BACKBONE and os.path.basename(backbone) == backbone and not backbone.startswith(".")
    return os.path.join(PACKAGE_DIR, backbone) if named else PACKAGE_DIR


def shipped(space: str, backbone: str = DEFAULT_BACKBONE) -> str:
    """Path of the artifact shipped for ``space`` and ``backbone`` (the newest by name if several).

    A backbone without artifacts of its own gets the default backbone's: its probabilities are
    then approximate (README "Pairs you can act on": refit for it)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    for folder in dict.fromkeys([shipped_dir(backbone), PACKAGE_DIR]):
        found = sorted(f for f in os.listdir(folder) if f.startswith(f"calibration-{space}-") and f.endswith(".npz")) \
            if os.path.isdir(folder) else []
        if found:
            return os.path.join(folder, found[-1])
    raise FileNotFoundError(f"no shipped calibration for space {space!r} in {PACKAGE_DIR} (run make calibrate)")


# ------------------------------------------------------------ curves and operating points

def precision_recall(scores: np.ndarray, labels: np.ndarray, n_true: int,
                     thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Pair precision and recall at each threshold (``score >= t``); recall over ``n_true``
    true pairs, so duplicates the search never proposed count as missed."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    out = []
    for t in thresholds:
        kept = scores >= t
        tp = int((kept & labels).sum())
        n = int(kept.sum())
        out.append({"threshold": float(t), "pairs": n, "precision": tp / n if n else 1.0,
                    "recall": tp / n_true if n_true else 1.0})
    return out


def curve(scores: np.ndarray, labels: np.ndarray, n_true: int, points: int = 300) -> list[dict[str, float]]:
    """The precision-recall curve: one point per distinct score (at most ``points``, evenly
    spaced by rank), from the highest threshold to the lowest."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if len(scores) == 0:
        return []
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], np.cumsum(labels[order])
    last_of_ties = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    if len(last_of_ties) > points:
        last_of_ties = last_of_ties[np.unique(np.linspace(0, len(last_of_ties) - 1, points).round().astype(int))]
    return [{"threshold": float(s[i]), "pairs": int(i + 1), "precision": float(tp[i] / (i + 1)),
             "recall": float(tp[i] / n_true) if n_true else 1.0} for i in last_of_ties]


def unlisted_can_pass(upper: np.ndarray, level: np.ndarray, cal: Calibration, threshold: float) -> np.ndarray:
    """Per image: could a pair outside its kNN list reach ``threshold``? ``upper`` bounds the
    similarity of any unlisted image (the k-th listed one), ``level`` is the image's own. The score
    rises with the cosine and falls with the pair's level (both coefficients positive, checked),
    and the pair's level is at least min(level, cap): so p(upper, level) bounds every unlisted pair."""
    if min(cal.coef) < 0:
        return np.ones(np.shape(upper), bool)  # no such bound for this model: always say "could"
    level = np.asarray(level, np.float64)
    return cal.probability(upper, level, level).astype(np.float32) >= threshold
