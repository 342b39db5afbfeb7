"""The one interface every way of turning images into vectors implements.

An :class:`Encoder` is built from a :class:`~pipeline.config.Config` (its ``embed.backbone``
names it) by :func:`pipeline.encoders.registry.encoder_for`, the only place that decides
which implementation a name means. The stages ask an encoder what they need and never test
what kind it is:

* identity: :attr:`name`, :meth:`fingerprint` (what, besides the image bytes, decides a vector);
* checks: :meth:`validate` (cheap, no model load, before Spark starts) and :meth:`preflight`
  (loads the model on the driver, returns the dimension);
* training needs: :attr:`learns`, :attr:`needs_training`, :meth:`with_artifact`, :meth:`training_params`;
* embedding: :meth:`embed_function`, a picklable per-batch function that the embed stage wraps
  in a pandas UDF (bytes in; one vector or one error per image out);
* search: :attr:`binary` (FAISS binary index, Hamming distance), :attr:`reranking` (DBA,
  alpha-QE, rotated queries apply), :meth:`search_config`, :meth:`threshold`;
* reporting: :meth:`mlflow_params`, :meth:`result_extras`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, ClassVar, Sequence

from pipeline.config import Config

# bytes of each image -> (vector or None, error or None) per image; runs in executors.
EmbedFunction = Callable[[Sequence[bytes]], tuple[list, list]]


class Encoder:
    """Base class: override what differs; the defaults describe a float, re-rankable encoder."""

    #: A short word for logs and docs: cnn, model_file, classical.
    kind: ClassVar[str] = "encoder"
    #: Vectors are bits searched by Hamming distance in a FAISS binary index.
    binary: ClassVar[bool] = False
    #: Database-side augmentation, alpha-query expansion and rotated queries apply.
    reranking: ClassVar[bool] = True
    #: The embed function has ``views(contents, rotations)``: rotated views from one decode.
    embeds_views: ClassVar[bool] = False
    #: Embed partitions per executor core (per-image CPU-bound methods want a few).
    partitions_per_core: ClassVar[int] = 1
    #: What ``neardup train`` learns for this encoder: the embedding post-processing
    #: (PCA-whitening, projection head) or a vocabulary / GMM.
    learns: ClassVar[str] = "postprocess"

    def __init__(self, config: Config):
        self.config = config
        self.name = config.embed.backbone

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --------------------------------------------------------------- checks
    def validate(self) -> None:
        """Cheap checks of the settings (no model load); raise ConfigError naming the bad value."""

    def preflight(self) -> int:
        """Load the model on the driver before Spark starts (missing weights fail in seconds).

        Returns the embedding dimension.
        """
        raise NotImplementedError

    # ------------------------------------------------------------- training
    @property
    def needs_training(self) -> bool:
        """True when :meth:`embed_function` needs an artifact that is not there yet."""
        return False

    def training_params(self) -> dict[str, Any]:
        """What the encoder was trained on (artifact, training set), as MLflow params."""
        return {}

    def with_artifact(self, uri: str) -> "Encoder":
        """The same encoder using the trained artifact at ``uri``."""
        raise NotImplementedError(f"{self.name} has no trained artifact")

    # ------------------------------------------------------------ embedding
    def fingerprint(self) -> dict[str, Any]:
        """What decides a vector besides the image bytes (committed with the embedding table)."""
        raise NotImplementedError

    def fingerprint_files(self) -> list[str]:
        """Local files whose size and modification time belong to the fingerprint."""
        return []

    def embed_function(self) -> EmbedFunction:
        """The per-batch function the embed stage runs in a pandas UDF (picklable)."""
        raise NotImplementedError

    # --------------------------------------------------------------- search
    def search_config(self) -> Config:
        """The config the search runs with: re-ranking switched off where it does not apply."""
        if self.reranking:
            return self.config
        return self.config.with_overrides(dedup__rotations=[0], dedup__dba_k=0, dedup__qe_k=0)

    def threshold(self, metric: str | None) -> float:
        """The similarity threshold for pairs, on the index's similarity scale."""
        return self.config.dedup.threshold

    # ------------------------------------------------------------ reporting
    def mlflow_params(self) -> dict[str, Any]:
        """The encoder's options, as MLflow params (analysts compare runs by these)."""
        return {}

    def result_extras(self) -> dict[str, Any]:
        """Extra keys of an evaluate result."""
        return {}


def file_identity(paths: Sequence[str]) -> dict[str, list[int]]:
    """``{path: [size, mtime_ns]}`` of the existing local files among ``paths``."""
    out = {}
    for path in paths:
        if isinstance(path, str) and path and os.path.isfile(path):
            st = os.stat(path)
            out[path] = [st.st_size, int(st.st_mtime_ns)]
    return out
