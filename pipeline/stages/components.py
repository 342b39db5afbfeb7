"""Connected components of the pairs graph in Spark, in O(log N) rounds on any graph.

The alternating large-star / small-star algorithm of Kiveris et al., "Connected Components
in MapReduce and Beyond" (SoCC 2014), as GraphFrames' ``connectedComponents`` runs it
(graphframes ``lib/TwoPhase.scala``). Plain min-label propagation needs as many rounds as
the longest shortest path: a burst of 3,000 frames that chain into one group took more than
100 rounds. Here the rounds grow with log N (proved O(log^2 N)), whatever the shape.

The edge set always keeps each component connected, and each round moves edges towards
the component's smallest node. It is done when the edges form stars centred on the
smallest node of each component; then every node's smallest neighbour is its label.

* Ids: image ids are numbered in their own order by longs for the rounds (narrower shuffles
  than 20-character strings); the smallest long of a component names its smallest image id.
* Lineage: the edge set is checkpointed every ``checkpoint_every`` rounds (to Parquet under
  ``checkpoint_dir`` when given, which survives a lost executor; else a local checkpoint),
  so the plan stays small however many rounds run.
* Skew (one group of 100k identical images: a node with 100k neighbours): inside the rounds
  nothing is joined; a node's edges meet in one window partition (sorted by one task, which
  spills to disk if it must), so a hub costs a long partition, not a blow-up. The final joins
  are many-to-one, and adaptive execution splits a skewed partition there.
* Convergence is tested exactly, not by a label sum: the graph is a union of stars centred
  on their smallest node iff every node that has a smaller neighbour has only one neighbour.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from pipeline import schemas as S
from pipeline.stages import tables

log = logging.getLogger(__name__)

# Internal column names (edges always run src < dst between rounds).
_V, _SRC, _DST, _X, _Y, _MIN, _MAX = "v", "src", "dst", "x", "y", "min_nbr", "max_nbr"


@dataclasses.dataclass
class ComponentsResult:
    groups: DataFrame  # (image_id, group_id)
    rounds: int
    seconds: float


# Up to this many pairs, the components are computed on the driver (scipy, about 100 bytes a
# pair): a bounded amount, not one that grows with the archive; each Spark round costs seconds
# of fixed overhead, which dominated dedup's grouping of 10k pairs at 100k images.
LOCAL_MAX_EDGES = 2_000_000


def connected_components(pairs: DataFrame, *, checkpoint_dir: str | None = None,
                         local_max_edges: int = LOCAL_MAX_EDGES) -> DataFrame:
    """(image_id, group_id) for every image in ``pairs``; group_id is the smallest id in its component.

    At most ``local_max_edges`` pairs: scipy on the driver (:func:`local_components`); more:
    the large-star / small-star rounds in Spark (:func:`run_components`).
    """
    if local_max_edges > 0 and pairs.limit(local_max_edges + 1).count() <= local_max_edges:
        return local_components(pairs)
    return run_components(pairs, checkpoint_dir=checkpoint_dir).groups


def local_components(pairs: DataFrame) -> DataFrame:
    """:func:`connected_components` of a small pairs table, on the driver (scipy.sparse.csgraph)."""
    import numpy as np
    import pandas as pd
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    started = time.perf_counter()
    edges = (pairs.select(F.col(S.IMAGE_ID_A).alias("a"), F.col(S.IMAGE_ID_B).alias("b"))
             .where(F.col("a").isNotNull() & F.col("b").isNotNull()).toPandas())
    ends = np.concatenate([edges["a"].to_numpy(object), edges["b"].to_numpy(object)])
    ids, codes = np.unique(ends.astype(str), return_inverse=True)  # sorted: code order = id order
    n, m = len(ids), len(edges)
    out = pd.DataFrame({S.IMAGE_ID: ids, S.GROUP_ID: ids})
    if n:
        graph = coo_matrix((np.ones(m, np.int8), (codes[:m], codes[m:])), shape=(n, n))
        _, labels = scipy_components(graph, directed=False)
        smallest = np.full(labels.max() + 1, n)
        np.minimum.at(smallest, labels, np.arange(n))
        out[S.GROUP_ID] = ids[smallest[labels]]
    log.info("connected components of %d images from %d pairs on the driver (%.1fs)", n, m,
             time.perf_counter() - started)
    schema = f"{S.IMAGE_ID} string, {S.GROUP_ID} string"
    return pairs.sparkSession.createDataFrame(out, schema=schema)


def round_limit(nodes: int) -> int:
    """A safety net far above the proved O(log^2 N) bound; reaching it means a bug, not a hard graph."""
    log_n = math.ceil(math.log2(nodes + 2))
    return 20 + 2 * log_n * log_n


def run_components(pairs: DataFrame, *, checkpoint_dir: str | None = None, checkpoint_every: int = 2,
                   max_rounds: int | None = None) -> ComponentsResult:
    """Components of the graph whose edges are ``pairs`` (image_id_a, image_id_b), with round count.

    ``checkpoint_dir``: a folder (any Hadoop URI) of this run's own for reliable checkpoints;
    the caller deletes it once the result is written. Without it, local checkpoints (faster,
    but lost with their executor, which then fails the job).
    """
    started = time.perf_counter()
    spark = pairs.sparkSession
    cut = _Checkpointer(spark, checkpoint_dir)
    raw = (pairs.select(F.col(S.IMAGE_ID_A).alias("a"), F.col(S.IMAGE_ID_B).alias("b"))
           .where(F.col("a").isNotNull() & F.col("b").isNotNull()))
    # Longs in the order of the image ids (a range-partitioned sort numbers partitions in key
    # order), so the smallest long of a component is its smallest image id. The numbering may
    # differ if recomputed: the checkpoint fixes the one every later step reads.
    ids = cut(raw.select(F.col("a").alias(S.IMAGE_ID)).union(raw.select(F.col("b").alias(S.IMAGE_ID)))
              .distinct().orderBy(S.IMAGE_ID).withColumn(_V, F.monotonically_increasing_id()), "ids")
    nodes = ids.count()
    limit = max_rounds if max_rounds is not None else round_limit(nodes)
    ids_a = ids.select(F.col(S.IMAGE_ID).alias("a"), F.col(_V).alias("va"))
    ids_b = ids.select(F.col(S.IMAGE_ID).alias("b"), F.col(_V).alias("vb"))
    coded = raw.join(ids_a, "a").join(ids_b, "b")
    edges = cut(coded.where(F.col("va") != F.col("vb"))  # a self pair only makes its image a node
                .select(F.least("va", "vb").alias(_SRC), F.greatest("va", "vb").alias(_DST)), "edges")

    rounds = 0
    labelled, previous = _label(edges).persist(), None
    while True:
        done = _is_star_forest(labelled)  # the action that computes this round
        if previous is not None:
            previous.unpersist()
        if done:
            break
        if rounds >= limit:
            raise RuntimeError(f"connected components did not converge in {limit} rounds on {nodes} nodes")
        rounds += 1
        following = _label(_small_star(_large_star(labelled)))
        following = cut(following, f"labels-{rounds}") if rounds % checkpoint_every == 0 else following.persist()
        labelled, previous = following, labelled
        log.debug("components round %d done after %.1fs", rounds, time.perf_counter() - started)
    mins = labelled.select(F.col(_X).alias(_SRC), _MIN).distinct()

    # A node without edges left had only self pairs, or is the smallest of its component.
    labels = ids.join(mins.select(F.col(_SRC).alias(_V), F.col(_MIN).alias("label")), _V, "left").select(
        S.IMAGE_ID, F.coalesce(F.col("label"), F.col(_V)).alias("label"))
    names = ids.select(F.col(_V).alias("label"), F.col(S.IMAGE_ID).alias(S.GROUP_ID))
    groups = labels.join(names, "label").select(S.IMAGE_ID, S.GROUP_ID)
    seconds = time.perf_counter() - started
    log.info("connected components of %d images converged in %d rounds (%.1fs)", nodes, rounds, seconds)
    return ComponentsResult(groups=groups, rounds=rounds, seconds=seconds)


def _label(edges: DataFrame) -> DataFrame:
    """(x, y, min_nbr, max_nbr) per directed edge x->y, deduplicated: min_nbr is the smallest of
    x and its neighbours, max_nbr the largest neighbour.

    One shuffle by x serves the de-duplication and both windows (a hash partitioning on x
    satisfies a distinct on (x, y)), so a round costs two shuffles, not six.
    """
    both = edges.select(F.explode(F.array(
        F.struct(F.col(_SRC).alias(_X), F.col(_DST).alias(_Y)),
        F.struct(F.col(_DST).alias(_X), F.col(_SRC).alias(_Y)))).alias("e")).select("e.*")
    by_node = Window.partitionBy(_X)
    return (both.repartition(_X).distinct()
            .select(_X, _Y, F.least(F.col(_X), F.min(_Y).over(by_node)).alias(_MIN),
                    F.max(_Y).over(by_node).alias(_MAX)))


def _is_star_forest(labelled: DataFrame) -> bool:
    """True when the edges are stars centred on their smallest node.

    Every node with a smaller neighbour has only one neighbour, so that neighbour is smaller
    and has a larger neighbour (it), hence no smaller one: it is a centre.
    """
    not_leaf = (F.col(_MIN) < F.col(_X)) & (F.col(_MAX) != F.col(_MIN))
    return labelled.where(not_leaf).limit(1).count() == 0


def _large_star(labelled: DataFrame) -> DataFrame:
    """Link every node's larger neighbours to its smallest neighbour (itself included): src > dst."""
    return labelled.where(F.col(_Y) > F.col(_X)).select(F.col(_Y).alias(_SRC), F.col(_MIN).alias(_DST))


def _small_star(edges: DataFrame) -> DataFrame:
    """Link every node and its smaller neighbours to the smallest of them: src < dst again.

    One row out per row in: the row that holds the smallest neighbour links the node itself.
    """
    smallest = F.min(_DST).over(Window.partitionBy(_SRC))
    return (edges.withColumn(_MIN, smallest)
            .select(F.col(_MIN).alias(_SRC),
                    F.when(F.col(_DST) == F.col(_MIN), F.col(_SRC)).otherwise(F.col(_DST)).alias(_DST)))


class _Checkpointer:
    """Cut a DataFrame's lineage: Parquet under a folder (reliable) or a local checkpoint."""

    def __init__(self, spark, folder: str | None):
        self.spark = spark
        self.folder = folder.rstrip("/") if folder else None
        self.previous: dict[str, str] = {}

    def __call__(self, df: DataFrame, name: str) -> DataFrame:
        if self.folder is None:
            return df.localCheckpoint(eager=True)
        kind = name.split("-")[0]
        path = f"{self.folder}/{name}"
        df.write.mode("overwrite").parquet(path)
        # Everything still in use reads the newest checkpoint of its kind or later steps.
        if kind in self.previous:
            tables.remove(self.spark, self.previous[kind])
        self.previous[kind] = path
        # Read back with the schema just written: no job to infer it at every iteration.
        return self.spark.read.schema(tables.as_read_back(df.schema)).parquet(path)
