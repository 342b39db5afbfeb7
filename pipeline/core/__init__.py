"""Pure numpy / PIL / FAISS building blocks: no Spark."""
