"""Spark stages: ingest, embed, index, search, re-rank, components, dedup."""
