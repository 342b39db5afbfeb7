"""Connected components of the pairs graph, in Spark."""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipeline import schemas as S

log = logging.getLogger(__name__)


def connected_components(pairs: DataFrame, max_iterations: int = 100) -> DataFrame:
    """(image_id, group_id) for every image in ``pairs``; group_id is the smallest id in its component.

    Min-label propagation with pointer jumping, in Spark: each round every node takes the
    smallest label among itself and its neighbours, then the label of its label. Rounds
    grow logarithmically with the component diameter; lineage is cut every round.
    """
    edges = pairs.select(F.col(S.IMAGE_ID_A).alias("src"), F.col(S.IMAGE_ID_B).alias("dst"))
    edges = edges.union(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst"))).localCheckpoint()
    labels = edges.select(F.col("src").alias("node")).distinct().withColumn("label", F.col("node")).localCheckpoint()
    for round_no in range(max_iterations):
        from_neighbors = edges.join(labels, edges.src == labels.node).select(F.col("dst").alias("node"), "label")
        propagated = labels.union(from_neighbors).groupBy("node").agg(F.min("label").alias("label"))
        # Renamed copies, not aliases: Spark mis-resolves a self-join of an aggregate.
        label_of_label = propagated.select(F.col("node").alias("hop"), F.col("label").alias("hop_label"))
        jumped = (propagated.join(label_of_label, propagated.label == label_of_label.hop)
                  .select("node", F.least("label", "hop_label").alias("label"))
                  .localCheckpoint())
        previous = labels.select(F.col("node").alias("prev_node"), F.col("label").alias("prev_label"))
        changed = (jumped.join(previous, jumped.node == previous.prev_node)
                   .where(F.col("label") != F.col("prev_label")).limit(1).count())
        labels = jumped
        if changed == 0:
            log.info("connected components converged after %d rounds", round_no + 1)
            return labels.select(F.col("node").alias(S.IMAGE_ID), F.col("label").alias(S.GROUP_ID))
    raise RuntimeError(f"connected components did not converge in {max_iterations} rounds")
