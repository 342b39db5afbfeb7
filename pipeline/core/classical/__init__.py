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
from pipeline.core.classical.base import ENCODING_VERSION, Artifact, ClassicalMethod
from pipeline.core.classical.registry import (_ENCODE_TIME_OPTIONS, ALL_CLASSICAL, CLASSICAL_METHODS, MethodSpec,
                                              get_method, is_classical,
                                              load_method_file)
from pipeline.core.classical.sift import LocalDescriptorMethod

__all__ = ["ALL_CLASSICAL", "CLASSICAL_METHODS", "ENCODING_VERSION", "Artifact", "ClassicalMethod",
           "LocalDescriptorMethod", "MethodSpec", "_ENCODE_TIME_OPTIONS", "get_method", "is_classical",
           "load_method_file"]
