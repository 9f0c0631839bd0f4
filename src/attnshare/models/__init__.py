"""Model loading: embedded models and GGUF files (converted once and cached), any Hugging Face id or local folder."""

from .loading import EMBEDDED, EmbeddedModel, load_model, model_identity

__all__ = ["EMBEDDED", "EmbeddedModel", "load_model", "model_identity"]
