"""Encoders: image bytes -> vectors (CNN backbones, model files, classical methods)."""
