"""Provenance: how open a model is (`openness`, with its sourced knowledge in `openness.yaml`),
and the model cards that carry a model's licence, base, data and making into everything
llamaforge writes (`modelcard`). Metadata only: no torch at import."""
