"""SIFT / RootSIFT (OpenCV) and the base of methods that aggregate local descriptors."""
from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np


from pipeline.core.classical.base import Artifact, ClassicalMethod

logger = logging.getLogger(__name__)


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
