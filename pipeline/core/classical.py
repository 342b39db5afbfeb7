"""Classical (pre-deep-learning) near-duplicate image descriptors.

Every method is exposed through one interface, :class:`ClassicalMethod`, and a
registry, :data:`CLASSICAL_METHODS`, so that the Spark embed / index / evaluate
jobs can treat them exactly like a neural backbone:

* perceptual hashes (``phash``, ``dhash``, ``ahash``, ``whash``) from the
  ``imagehash`` library, 64 bits packed to 8 ``uint8`` bytes and searched with
  a FAISS binary (Hamming) index;
* aggregated local descriptors built on OpenCV SIFT / RootSIFT: bag of visual
  words with tf-idf (``bow``, ``bow-soft``), VLAD (``vlad``, ``vlad-ssr``,
  ``vlad-intra``, ``vlad-pca``) and improved Fisher vectors (``fisher``).
  These need a vocabulary (FAISS k-means) or a GMM (scikit-learn) trained on a
  collection that is *not* the evaluated one; the trained state is an
  :class:`Artifact` stored as a single ``.npz`` (arrays + JSON metadata, never
  pickle).

Float methods return float32 rows with unit L2 norm (an all-zero row when an
image yields no keypoint), to be searched by inner product.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Bumped whenever an encoding changes in a way that invalidates stored
#: vectors or artifacts, so that stale indexes are detected by the version hash.
ENCODING_VERSION = 1

_ARTIFACT_META_KEY = "__meta_json__"


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


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


def is_binary_method(name: str) -> bool:
    """Whether ``name`` is a perceptual hash: bit vectors, Hamming distance."""
    return name in CLASSICAL_METHODS and CLASSICAL_METHODS[name].family == "hash"


def expand_methods(names: Iterable[str]) -> list[str]:
    """Expand ``all-classical`` into every classical method (registry order), dropping repeats."""
    out: list[str] = []
    for name in names:
        for n in (list(CLASSICAL_METHODS) if name == ALL_CLASSICAL else [name]):
            if n not in out:
                out.append(n)
    return out


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


# ---------------------------------------------------------------------------
# Artifact
# ---------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class Artifact:
    """Trained state of a classical method: arrays plus JSON-able metadata.

    Attributes
    ----------
    method : str
        Registry name of the method that produced it.
    params : dict
        Method parameters it was trained with.
    arrays : dict of str to ndarray
        Numeric state (centroids, idf, GMM, PCA ...).
    training : dict
        Description of the training collection (names, counts, timing).
    version : str
        Hash of method, params, encoding version and array bytes; two
        artifacts with the same version produce identical vectors.
    """

    method: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        self.params = _jsonable(self.params)
        self.training = _jsonable(self.training)
        if not self.version:
            self.version = self.compute_version()

    def compute_version(self) -> str:
        """Return a short content hash of the artifact.

        Returns
        -------
        str
            16 hex digits of a SHA-256 over method, params and arrays.
        """
        h = hashlib.sha256()
        h.update(json.dumps([self.method, self.params, ENCODING_VERSION], sort_keys=True).encode())
        for key in sorted(self.arrays):
            arr = np.ascontiguousarray(self.arrays[key])
            h.update(key.encode())
            h.update(str(arr.dtype).encode())
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str) -> str:
        """Write the artifact as one ``.npz`` (metadata as a JSON string entry).

        Parameters
        ----------
        path : str
            Destination; ``.npz`` is appended by numpy if missing.

        Returns
        -------
        str
            The path actually written.
        """
        meta = {
            "method": self.method,
            "params": self.params,
            "training": self.training,
            "version": self.version,
            "encoding_version": ENCODING_VERSION,
            "arrays": sorted(self.arrays),
        }
        if _ARTIFACT_META_KEY in self.arrays:
            raise ValueError(f"array name {_ARTIFACT_META_KEY} is reserved")
        path = str(path)
        if not path.endswith(".npz"):
            path += ".npz"
        # A unicode scalar array loads with allow_pickle=False, unlike an object array.
        np.savez(path, **{_ARTIFACT_META_KEY: np.array(json.dumps(meta, sort_keys=True))}, **self.arrays)
        logger.info("saved %s artifact %s to %s", self.method, self.version, path)
        return path

    @classmethod
    def load(cls, path: str) -> "Artifact":
        """Read an artifact written by :meth:`save` (never unpickles).

        Parameters
        ----------
        path : str
            ``.npz`` file.

        Returns
        -------
        Artifact
            With its version checked against the stored arrays.
        """
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data[_ARTIFACT_META_KEY]))
            arrays = {k: data[k] for k in data.files if k != _ARTIFACT_META_KEY}
        if meta.get("encoding_version") != ENCODING_VERSION:
            raise ValueError(
                f"artifact {path} has encoding version {meta.get('encoding_version')}, "
                f"this code writes {ENCODING_VERSION}; retrain it"
            )
        art = cls(meta["method"], meta["params"], arrays, meta.get("training", {}), version="")
        if art.version != meta["version"]:
            raise ValueError(f"artifact {path} is corrupt: version {meta['version']} != content {art.version}")
        return art


# ---------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------


class ClassicalMethod:
    """Uniform interface of a classical near-duplicate descriptor.

    Attributes
    ----------
    name : str
        Registry name.
    params : dict
        Effective options.
    is_binary : bool
        ``True`` for hashes: :meth:`encode` returns packed ``uint8`` bits for a
        FAISS ``IndexBinaryFlat``; ``False``: float32 unit rows for inner product.
    dim : int
        Float dimension, or number of bits for binary methods.
    needs_training : bool
        Whether :meth:`fit` (or an artifact) is required before :meth:`encode`.
    """

    is_binary: ClassVar[bool] = False
    needs_training: ClassVar[bool] = True

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.params = dict(params)
        self.artifact: Artifact | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, params={self.params})"

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`encode` can run."""
        return not self.needs_training or self.artifact is not None

    @property
    def version(self) -> str:
        """Hash identifying the vectors this method produces (artifact + params)."""
        art = self.artifact if self.artifact is not None else Artifact(self.name, self.params)
        h = hashlib.sha256(json.dumps([art.version, _jsonable(self.params)], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        """Encode RGB PIL images.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Decoded images (EXIF orientation already applied by the caller).

        Returns
        -------
        ndarray
            ``(n, dim)`` float32 unit rows, or ``(n, dim // 8)`` uint8 for hashes.
        """
        raise NotImplementedError

    def fit(self, images_iter: Iterable[Any], **train_options: Any) -> Artifact:
        """Train the method's model on a collection (not the evaluated one).

        Parameters
        ----------
        images_iter : iterable of PIL.Image.Image
            Training images, consumed once.
        **train_options
            Family specific (e.g. ``max_descriptors``, ``seed``, ``description``).

        Returns
        -------
        Artifact
            Also attached to the method, so :meth:`encode` works afterwards.
        """
        raise NotImplementedError

    def _set_artifact(self, artifact: Artifact) -> None:
        self.artifact = artifact

    def save(self, path: str) -> str:
        """Save the trained artifact (or, for hashes, just the parameters).

        Parameters
        ----------
        path : str
            Destination ``.npz``.

        Returns
        -------
        str
            The path written.
        """
        art = self.artifact if self.artifact is not None else Artifact(self.name, self.params)
        if self.needs_training and self.artifact is None:
            raise RuntimeError(f"{self.name}: nothing to save, call fit() first")
        return art.save(path)

    @classmethod
    def load(cls, path: str, **options: Any) -> "ClassicalMethod":
        """Rebuild a method from a saved artifact.

        Parameters
        ----------
        path : str
            ``.npz`` written by :meth:`save`.
        **options
            Encode-time overrides, as for :func:`get_method`.

        Returns
        -------
        ClassicalMethod
            The registered method named in the artifact.
        """
        art = Artifact.load(path)
        return get_method(art.method, artifact_path=path, **options)

    def _require_trained(self) -> Artifact:
        if self.artifact is None:
            raise RuntimeError(f"{self.name} needs a trained artifact: call fit() or pass artifact_path")
        return self.artifact


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalise along ``axis``, leaving all-zero vectors at zero.

    Parameters
    ----------
    x : ndarray
        Input array.
    axis : int
        Axis to normalise.

    Returns
    -------
    ndarray
        float32 array of the same shape.
    """
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def signed_power(x: np.ndarray, alpha: float) -> np.ndarray:
    """Power-law normalisation ``sign(x) * |x| ** alpha`` (alpha 0.5 = SSR).

    Parameters
    ----------
    x : ndarray
        Input.
    alpha : float
        Exponent; 1 leaves ``x`` unchanged.

    Returns
    -------
    ndarray
        float32 array of the same shape.
    """
    x = np.asarray(x, dtype=np.float32)
    if alpha == 1:
        return x
    return (np.sign(x) * np.abs(x) ** alpha).astype(np.float32)


# ---------------------------------------------------------------------------
# Perceptual hashes
# ---------------------------------------------------------------------------


class HashMethod(ClassicalMethod):
    """64-bit perceptual hash from ``imagehash``, packed to 8 bytes."""

    is_binary = True
    needs_training = False

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)
        import imagehash

        algorithms: dict[str, Callable[..., Any]] = {
            "phash": imagehash.phash,
            "dhash": imagehash.dhash,
            "ahash": imagehash.average_hash,
            "whash": imagehash.whash,
        }
        algo = self.params["algorithm"]
        if algo not in algorithms:
            raise ValueError(f"unknown hash algorithm {algo!r}; known: {sorted(algorithms)}")
        self._fn = algorithms[algo]

    @property
    def dim(self) -> int:
        return int(self.params["hash_size"]) ** 2

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        out = np.zeros((len(images), self.dim // 8), dtype=np.uint8)
        for i, img in enumerate(images):
            bits = np.asarray(self._fn(img, hash_size=self.params["hash_size"]).hash, dtype=bool).ravel()
            out[i] = np.packbits(bits)
        return out

    def fit(self, images_iter: Iterable[Any], **train_options: Any) -> Artifact:
        self.artifact = Artifact(self.name, self.params, training={"note": "hashes need no training"})
        return self.artifact


# ---------------------------------------------------------------------------
# SIFT based methods
# ---------------------------------------------------------------------------


def to_gray(image: Any, max_side: int | None) -> np.ndarray:
    """Convert a PIL image to a uint8 grey array no larger than ``max_side``.

    Parameters
    ----------
    image : PIL.Image.Image
        Any mode.
    max_side : int or None
        Longest side after (downscaling only) resize; ``None`` keeps the size.

    Returns
    -------
    ndarray
        ``(h, w)`` uint8.
    """
    import cv2

    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    h, w = gray.shape
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return gray


def rootsift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise then square root.

    Parameters
    ----------
    desc : ndarray
        ``(n, 128)`` SIFT descriptors (non-negative).

    Returns
    -------
    ndarray
        float32 rows with unit L2 norm (Hellinger kernel becomes a dot product).
    """
    desc = np.asarray(desc, dtype=np.float32)
    l1 = desc.sum(axis=1, keepdims=True)
    return np.sqrt(np.divide(desc, l1, out=np.zeros_like(desc), where=l1 > 0))


class SiftExtractor:
    """OpenCV SIFT on a downscaled grey image, optionally RootSIFT.

    Parameters
    ----------
    max_side : int
        Images are downscaled so their longest side is at most this.
    nfeatures : int
        Keypoint cap (strongest responses kept by OpenCV).
    rootsift : bool
        Apply RootSIFT; otherwise rows are raw SIFT (L2 norm about 512).
    """

    def __init__(self, max_side: int = 640, nfeatures: int = 1000, rootsift: bool = True) -> None:
        import cv2

        self.max_side = max_side
        self.nfeatures = nfeatures
        self.rootsift = rootsift
        # OpenCV parallelises internally; leave its thread count to the caller.
        self._sift = cv2.SIFT_create(nfeatures=nfeatures)

    def __call__(self, image: Any) -> np.ndarray:
        """Return ``(n, 128)`` float32 descriptors of one PIL image (n may be 0)."""
        gray = to_gray(image, self.max_side)
        _, desc = self._sift.detectAndCompute(gray, None)
        if desc is None or len(desc) == 0:
            return np.zeros((0, 128), dtype=np.float32)
        # OpenCV may return slightly more than nfeatures when responses tie.
        desc = desc[: self.nfeatures]
        return rootsift(desc) if self.rootsift else desc.astype(np.float32)


def _kmeans(sample: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    import faiss

    if len(sample) < k:
        raise ValueError(f"need at least k={k} training descriptors, got {len(sample)}")
    km = faiss.Kmeans(sample.shape[1], k, niter=niter, seed=seed, verbose=False, max_points_per_centroid=100000)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def _sample_rows(per_image: Sequence[np.ndarray], max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform sample of descriptors across images, at most ``max_rows``."""
    allr = np.concatenate([d for d in per_image if len(d)], axis=0) if per_image else np.zeros((0, 128), np.float32)
    if len(allr) > max_rows:
        allr = allr[rng.choice(len(allr), max_rows, replace=False)]
    return np.ascontiguousarray(allr, dtype=np.float32)


class LocalDescriptorMethod(ClassicalMethod):
    """Base of methods that aggregate SIFT descriptors into one vector.

    Subclasses implement :meth:`_train` (descriptors -> arrays) and
    :meth:`encode_descriptors` (descriptors -> vectors). Descriptor-level entry
    points are public so callers can cache SIFT per image and reuse it across
    methods.
    """

    family: ClassVar[str] = ""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        super().__init__(name, params)
        self.extractor = SiftExtractor(
            int(self.params["max_side"]), int(self.params["nfeatures"]), bool(self.params["rootsift"])
        )

    def extract(self, images: Sequence[Any]) -> list[np.ndarray]:
        """SIFT/RootSIFT descriptors of each image.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Input images.

        Returns
        -------
        list of ndarray
            One ``(n_i, 128)`` float32 array per image.
        """
        return [self.extractor(img) for img in images]

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        return self.encode_descriptors(self.extract(images))

    def encode_descriptors(self, per_image: Sequence[np.ndarray]) -> np.ndarray:
        """Aggregate per-image descriptors (as returned by :meth:`extract`).

        Parameters
        ----------
        per_image : sequence of ndarray
            ``(n_i, 128)`` descriptors, one array per image.

        Returns
        -------
        ndarray
            ``(len(per_image), dim)`` float32 unit rows (zero row if ``n_i == 0``).
        """
        self._require_trained()
        out = np.zeros((len(per_image), self.dim), dtype=np.float32)
        for i, desc in enumerate(per_image):
            if len(desc):
                out[i] = self._encode_one(np.ascontiguousarray(desc, dtype=np.float32))
        return out

    def fit(self, images_iter: Iterable[Any], **train_options: Any) -> Artifact:
        per_image = []
        t0 = time.perf_counter()
        for img in images_iter:
            per_image.append(self.extractor(img))
        logger.info("%s: extracted SIFT from %d training images in %.1fs",
                    self.name, len(per_image), time.perf_counter() - t0)
        return self.fit_descriptors(per_image, **train_options)

    def fit_descriptors(
        self,
        per_image: Sequence[np.ndarray],
        max_descriptors: int = 200_000,
        seed: int = 0,
        niter: int = 20,
        description: str = "",
    ) -> Artifact:
        """Train from per-image descriptors.

        Parameters
        ----------
        per_image : sequence of ndarray
            Descriptors of the training images, extracted with the same
            SIFT settings as :attr:`params`.
        max_descriptors : int
            Descriptors sampled for k-means / GMM (uniformly across images).
        seed : int
            Seeds sampling, k-means and GMM.
        niter : int
            k-means iterations.
        description : str
            Human description of the training collection, kept in the artifact.

        Returns
        -------
        Artifact
            Attached to this method.
        """
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        sample = _sample_rows(per_image, max_descriptors, rng)
        arrays, extra = self._train(per_image, sample, seed, niter)
        training = {
            "description": description,
            "n_images": len(per_image),
            "n_descriptors_total": int(sum(len(d) for d in per_image)),
            "n_descriptors_sampled": len(sample),
            "seed": seed,
            "niter": niter,
            "fit_seconds": round(time.perf_counter() - t0, 2),
            **extra,
        }
        self.artifact = Artifact(self.name, self.params, arrays, training)
        self._set_artifact(self.artifact)
        logger.info("%s: trained in %.1fs (%d images, %d descriptors sampled), version %s",
                    self.name, training["fit_seconds"], len(per_image), len(sample), self.artifact.version)
        return self.artifact

    def _train(
        self, per_image: Sequence[np.ndarray], sample: np.ndarray, seed: int, niter: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        raise NotImplementedError

    def _encode_one(self, desc: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _CentroidIndexMixin:
    """Holds a FAISS flat L2 index over the vocabulary for fast assignment."""

    _index: Any = None

    def _build_index(self, centroids: np.ndarray) -> None:
        import faiss

        self._index = faiss.IndexFlatL2(centroids.shape[1])
        self._index.add(np.ascontiguousarray(centroids, dtype=np.float32))

    def _assign(self, desc: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        dist, idx = self._index.search(np.ascontiguousarray(desc, dtype=np.float32), k)
        return dist, idx


class BowMethod(_CentroidIndexMixin, LocalDescriptorMethod):
    """Bag of visual words with tf-idf, hard or soft assignment.

    ``soft_k`` > 1 spreads each descriptor over its nearest words with weights
    ``exp(-d^2 / (2 sigma^2))`` (Philbin et al. 2008); ``sigma^2`` defaults to
    the mean squared distance to the nearest word on the training set.
    ``power`` < 1 damps bursty words before the final L2 normalisation.
    """

    family = "bow"

    @property
    def dim(self) -> int:
        return int(self.params["k"])

    def _train(self, per_image, sample, seed, niter):
        k = int(self.params["k"])
        centroids = _kmeans(sample, k, seed, niter)
        self._build_index(centroids)
        df = np.zeros(k, dtype=np.float64)
        nn_d2 = []
        for desc in per_image:
            if len(desc) == 0:
                continue
            d, idx = self._assign(desc, 1)
            df[np.unique(idx[:, 0])] += 1
            nn_d2.append(d[:, 0])
        n = max(1, sum(1 for d in per_image if len(d)))
        sigma2 = float(np.mean(np.concatenate(nn_d2))) if nn_d2 else 1.0
        # Document frequencies are stored rather than idf so the idf variant stays an encode-time choice.
        return (
            {"centroids": centroids, "df": df.astype(np.float32), "n_train_images": np.array(n, dtype=np.int64),
             "sigma2": np.array(sigma2, dtype=np.float32)},
            {"empty_words": int((df == 0).sum())},
        )

    @property
    def idf(self) -> np.ndarray:
        """Inverse document frequency of each word, per the ``idf`` option.

        ``"classic"`` is ``log(N / df)``, which is zero for words present in
        every training image -- common with the small vocabularies that small
        training sets allow -- so the default ``"smooth"`` adds 1 as
        scikit-learn does: ``log((N + 1) / (df + 1)) + 1``. ``"none"`` is tf only.
        """
        a = self._require_trained().arrays
        df, n = a["df"].astype(np.float64), float(a["n_train_images"])
        mode = self.params["idf"]
        if mode == "smooth":
            idf = np.log((n + 1) / (df + 1)) + 1
        elif mode == "classic":
            idf = np.log(n / np.maximum(df, 1))
        elif mode == "none":
            idf = np.ones_like(df)
        else:
            raise ValueError(f"idf must be 'smooth', 'classic' or 'none', got {mode!r}")
        return idf.astype(np.float32)

    def _set_artifact(self, artifact: Artifact) -> None:
        super()._set_artifact(artifact)
        self._build_index(artifact.arrays["centroids"])
        self._idf = self.idf

    def _encode_one(self, desc: np.ndarray) -> np.ndarray:
        art = self.artifact
        k = int(self.params["k"])
        soft_k = int(self.params["soft_k"])
        hist = np.zeros(k, dtype=np.float32)
        if soft_k <= 1:
            _, idx = self._assign(desc, 1)
            np.add.at(hist, idx[:, 0], 1.0)
        else:
            d2, idx = self._assign(desc, soft_k)
            sigma2 = self.params.get("soft_sigma2") or float(art.arrays["sigma2"])
            # Distances relative to the nearest word avoid underflow for far descriptors.
            w = np.exp(-(d2 - d2[:, :1]) / (2.0 * sigma2))
            w /= w.sum(axis=1, keepdims=True)
            np.add.at(hist, idx.ravel(), w.ravel().astype(np.float32))
        hist /= len(desc)
        hist *= self._idf
        return l2_normalize(signed_power(hist, float(self.params["power"])))


class VladMethod(_CentroidIndexMixin, LocalDescriptorMethod):
    """VLAD (Jegou et al. 2010): sum of residuals to the nearest of k centroids.

    Normalisation order: signed square root (``ssr``), intra-normalisation of
    each centroid block (``intra``), global L2; then optional PCA (learned on
    the training images' VLADs, ``pca_dim``, optional ``whiten``) and L2 again.
    """

    family = "vlad"

    @property
    def dim(self) -> int:
        return int(self.params["pca_dim"] or int(self.params["k"]) * 128)

    def _set_artifact(self, artifact: Artifact) -> None:
        super()._set_artifact(artifact)
        self._centroids = artifact.arrays["centroids"]
        self._build_index(self._centroids)

    def _raw(self, desc: np.ndarray) -> np.ndarray:
        centroids = self._centroids
        k = centroids.shape[0]
        _, idx = self._assign(desc, 1)
        idx = idx[:, 0]
        v = np.zeros((k, desc.shape[1]), dtype=np.float32)
        np.add.at(v, idx, desc - centroids[idx])
        if self.params["ssr"]:
            v = signed_power(v, 0.5)
        if self.params["intra"]:
            v = l2_normalize(v, axis=1)
        return l2_normalize(v.ravel())

    def _train(self, per_image, sample, seed, niter):
        k = int(self.params["k"])
        # _raw() needs the new vocabulary before the artifact exists (for PCA training).
        self._centroids = _kmeans(sample, k, seed, niter)
        self._build_index(self._centroids)
        arrays: dict[str, np.ndarray] = {"centroids": self._centroids}
        extra: dict[str, Any] = {}
        pca_dim = self.params["pca_dim"]
        if pca_dim:
            vlads = np.stack([self._raw(d) for d in per_image if len(d)])
            mean, comps, eig = _pca(vlads, int(pca_dim))
            arrays.update(pca_mean=mean, pca_components=comps, pca_eigvals=eig)
            extra["pca_explained_variance"] = float(eig.sum() / max(1e-12, np.var(vlads, axis=0, ddof=1).sum()))
        return arrays, extra

    def _encode_one(self, desc: np.ndarray) -> np.ndarray:
        v = self._raw(desc)
        arrays = self.artifact.arrays
        if "pca_components" in arrays:
            v = (v - arrays["pca_mean"]) @ arrays["pca_components"].T
            if self.params["whiten"]:
                v = v / np.sqrt(arrays["pca_eigvals"] + 1e-9)
            v = l2_normalize(v)
        return v


def _pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA by SVD of centred data; returns mean, (dim, d) components, eigenvalues."""
    x = np.asarray(x, dtype=np.float64)
    if dim > min(x.shape):
        raise ValueError(f"PCA to {dim} dims needs at least {dim} training vectors of dim >= {dim}, got {x.shape}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    eig = s[:dim] ** 2 / max(1, len(x) - 1)
    return mean.astype(np.float32), vt[:dim].astype(np.float32), eig.astype(np.float32)


class FisherMethod(LocalDescriptorMethod):
    """Improved Fisher vector (Perronnin et al. 2010).

    Descriptors are PCA-reduced (``desc_pca_dim``, 64 in the literature), a
    diagonal GMM with ``k`` components is fit with scikit-learn, and each image
    is the gradient w.r.t. means and standard deviations (``2 * k * D`` dims),
    followed by power (``power``) and L2 normalisation. Posteriors are computed
    here from the stored GMM arrays, so no sklearn object is ever serialised.
    """

    family = "fisher"

    @property
    def dim(self) -> int:
        return 2 * int(self.params["k"]) * int(self.params["desc_pca_dim"])

    def _train(self, per_image, sample, seed, niter):
        from sklearn.mixture import GaussianMixture

        dp = int(self.params["desc_pca_dim"])
        k = int(self.params["k"])
        mean, comps, eig = _pca(sample, dp)
        xs = (sample - mean) @ comps.T
        # Seeding EM with FAISS k-means is much faster than sklearn's own k-means init.
        means_init = _kmeans(xs, k, seed, niter)
        gmm = GaussianMixture(
            n_components=k, covariance_type="diag", means_init=means_init,
            max_iter=100, reg_covar=1e-6, random_state=seed,
        )
        gmm.fit(xs)
        arrays = {
            "pca_mean": mean, "pca_components": comps, "pca_eigvals": eig,
            "gmm_weights": gmm.weights_.astype(np.float32),
            "gmm_means": gmm.means_.astype(np.float32),
            "gmm_vars": gmm.covariances_.astype(np.float32),
        }
        return arrays, {"gmm_converged": bool(gmm.converged_), "gmm_iter": int(gmm.n_iter_)}

    def _encode_one(self, desc: np.ndarray) -> np.ndarray:
        a = self.artifact.arrays
        x = ((desc - a["pca_mean"]) @ a["pca_components"].T).astype(np.float64)
        w = a["gmm_weights"].astype(np.float64)
        mu = a["gmm_means"].astype(np.float64)
        var = a["gmm_vars"].astype(np.float64)
        prec = 1.0 / var
        # log N(x | mu_k, var_k) for all k at once: expand (x-mu)^2 / var.
        log_prob = -0.5 * (
            (x ** 2) @ prec.T - 2.0 * x @ (mu * prec).T + np.sum(mu ** 2 * prec, axis=1)
            + np.sum(np.log(var), axis=1) + x.shape[1] * math.log(2 * math.pi)
        ) + np.log(w)
        log_prob -= log_prob.max(axis=1, keepdims=True)
        gamma = np.exp(log_prob)
        gamma /= gamma.sum(axis=1, keepdims=True)
        n = len(x)
        sigma = np.sqrt(var)
        s0 = gamma.sum(axis=0)                       # (k,)
        s1 = gamma.T @ x                             # (k, D)
        s2 = gamma.T @ (x ** 2)                      # (k, D)
        g_mu = (s1 - mu * s0[:, None]) / sigma / (n * np.sqrt(w)[:, None])
        g_sig = (s2 - 2 * mu * s1 + (mu ** 2 - var) * s0[:, None]) / var / (n * np.sqrt(2 * w)[:, None])
        fv = np.concatenate([g_mu.ravel(), g_sig.ravel()]).astype(np.float32)
        return l2_normalize(signed_power(fv, float(self.params["power"])))


_FAMILY_CLASSES: dict[str, type[ClassicalMethod]] = {
    "hash": HashMethod,
    "bow": BowMethod,
    "vlad": VladMethod,
    "fisher": FisherMethod,
}
