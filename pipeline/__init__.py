"""neardup: near-duplicate image detection on Spark, FAISS and MLflow."""
