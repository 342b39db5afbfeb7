"""The train job: embedding post-processing and classical vocabularies."""
