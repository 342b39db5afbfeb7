"""The registry of classical methods: names, families, defaults, and :func:`get_method`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any



from pipeline.core.classical.base import Artifact, ClassicalMethod
from pipeline.core.classical.bow import BowMethod
from pipeline.core.classical.fisher import FisherMethod
from pipeline.core.classical.hashes import HashMethod
from pipeline.core.classical.vlad import VladMethod

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """Static description of one registered classical method.

    Attributes
    ----------
    name : str
        Registry key.
    family : str
        One of ``"hash"``, ``"bow"``, ``"vlad"``, ``"fisher"``.
    defaults : dict
        Default options; :func:`get_method` overrides them with ``**options``.
    description : str
        One line for ``--help`` style listings.
    """

    name: str
    family: str
    defaults: dict[str, Any]
    description: str


# 640 px keeps UKBench (640x480) at native size and 1000 keypoints bounds SIFT and
# assignment cost. BoW uses power 1.0 because on ukbench-dev / holidays-dev with
# k=1024 the sqrt damping cost 0.07 Holidays mAP: with ~1000 descriptors over
# 1024 words the histograms are dense, and sqrt flattens them towards uniform.
_SIFT_DEFAULTS: dict[str, Any] = {"max_side": 640, "nfeatures": 1000, "rootsift": True}


CLASSICAL_METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec("phash", "hash", {"algorithm": "phash", "hash_size": 8}, "DCT perceptual hash, 64 bits"),
        MethodSpec("dhash", "hash", {"algorithm": "dhash", "hash_size": 8}, "difference hash, 64 bits"),
        MethodSpec("ahash", "hash", {"algorithm": "ahash", "hash_size": 8}, "average hash, 64 bits"),
        MethodSpec("whash", "hash", {"algorithm": "whash", "hash_size": 8}, "Haar wavelet hash, 64 bits"),
        MethodSpec(
            "bow", "bow",
            {**_SIFT_DEFAULTS, "k": 1024, "soft_k": 1, "power": 1.0, "idf": "smooth", "soft_sigma2": None},
            "bag of visual words, hard assignment, tf-idf, L2",
        ),
        MethodSpec(
            "bow-soft", "bow",
            {**_SIFT_DEFAULTS, "k": 1024, "soft_k": 3, "power": 1.0, "idf": "smooth", "soft_sigma2": None},
            "bag of visual words, soft assignment to 3 words (Gaussian), tf-idf, L2",
        ),
        MethodSpec(
            "vlad", "vlad",
            {**_SIFT_DEFAULTS, "k": 64, "ssr": False, "intra": False, "pca_dim": None, "whiten": False},
            "VLAD (Jegou 2010), L2 only",
        ),
        MethodSpec(
            "vlad-ssr", "vlad",
            {**_SIFT_DEFAULTS, "k": 64, "ssr": True, "intra": False, "pca_dim": None, "whiten": False},
            "VLAD with signed square root + L2",
        ),
        MethodSpec(
            "vlad-intra", "vlad",
            {**_SIFT_DEFAULTS, "k": 64, "ssr": True, "intra": True, "pca_dim": None, "whiten": False},
            "VLAD with signed square root, intra-normalisation + L2 (Arandjelovic 2013)",
        ),
        MethodSpec(
            "vlad-pca", "vlad",
            {**_SIFT_DEFAULTS, "k": 64, "ssr": True, "intra": False, "pca_dim": 256, "whiten": False},
            "VLAD-SSR reduced to 256-D with PCA learned on the training set",
        ),
        MethodSpec(
            "fisher", "fisher",
            {**_SIFT_DEFAULTS, "k": 64, "desc_pca_dim": 64, "power": 0.5},
            "improved Fisher vector, diagonal GMM on PCA-64 SIFT, power + L2",
        ),
    ]
}


# Options that only change how an image is encoded given a trained artifact;
# all others define the trained model and must match the artifact.
_ENCODE_TIME_OPTIONS: dict[str, set[str]] = {
    "hash": set(),
    "bow": {"soft_k", "power", "soft_sigma2", "idf"},
    "vlad": {"ssr", "intra"},
    "fisher": {"power"},
}


def _known_names() -> str:
    return ", ".join(sorted(CLASSICAL_METHODS))


#: The pseudo-name that ``evaluate --methods`` expands to every registered classical method.
ALL_CLASSICAL = "all-classical"


def is_classical(name: str) -> bool:
    """Whether ``name`` is a classical method (rather than a CNN backbone or a .keras file)."""
    return name in CLASSICAL_METHODS


_FAMILY_CLASSES: dict[str, type[ClassicalMethod]] = {
    "hash": HashMethod,
    "bow": BowMethod,
    "vlad": VladMethod,
    "fisher": FisherMethod,
}


def get_method(name: str, artifact_path: str | None = None, **options: Any) -> "ClassicalMethod":
    """Build a classical method by registry name.

    Parameters
    ----------
    name : str
        A key of :data:`CLASSICAL_METHODS`.
    artifact_path : str, optional
        ``.npz`` artifact written by :meth:`ClassicalMethod.save`. Its trained
        parameters (vocabulary size, SIFT settings, PCA, ...) take precedence;
        encode-time options (e.g. ``power``, ``ssr``) may still be overridden.
    **options
        Overrides of the registry defaults (e.g. ``k=256``, ``rootsift=False``).

    Returns
    -------
    ClassicalMethod
        Ready to encode if it needs no training or an artifact was given.

    Raises
    ------
    ValueError
        Unknown method name or option, or an option that contradicts the artifact.
    """
    if name not in CLASSICAL_METHODS:
        raise ValueError(f"unknown classical method {name!r}; known methods: {_known_names()}")
    spec = CLASSICAL_METHODS[name]
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method {name!r}; valid: {sorted(spec.defaults)}"
        )
    params = {**spec.defaults, **options}
    artifact = None
    if artifact_path is not None:
        artifact = Artifact.load(artifact_path)
        if CLASSICAL_METHODS.get(artifact.method, spec).family != spec.family:
            raise ValueError(
                f"artifact {artifact_path} was trained for {artifact.method!r}, "
                f"which is not compatible with {name!r}"
            )
        encode_time = _ENCODE_TIME_OPTIONS[spec.family]
        for key, value in options.items():
            if key not in encode_time and key in artifact.params and artifact.params[key] != value:
                raise ValueError(
                    f"option {key}={value!r} contradicts artifact {artifact_path} ({key}={artifact.params[key]!r})"
                )
        # Trained parameters come from the artifact, encode-time ones from the caller/registry.
        params = {
            **params,
            **{k: v for k, v in artifact.params.items() if k not in encode_time or k not in options},
        }
        params = {k: v for k, v in params.items() if k in spec.defaults}
    cls = _FAMILY_CLASSES[spec.family]
    method = cls(name, params)
    if artifact is not None:
        method._set_artifact(artifact)
    return method


def load_method_file(path: str, **options: Any) -> ClassicalMethod:
    """Rebuild the method named in a saved artifact (``.npz`` written by :meth:`ClassicalMethod.save`).

    ``options``: encode-time overrides, as for :func:`get_method`.
    """
    return get_method(Artifact.load(path).method, artifact_path=path, **options)
