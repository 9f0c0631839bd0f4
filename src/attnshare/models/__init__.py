"""Model loading: embedded models (converted once and cached) and any Hugging Face id or local folder."""

from .loading import EMBEDDED, EmbeddedModel, load_model, model_identity

__all__ = ["EMBEDDED", "EmbeddedModel", "load_model", "model_identity"]
