"""Finding and loading models: embedded short names, Hugging Face directories, GGUF files and
slimquant checkpoints. Loading never unpickles: safetensors, GGUF and JSON only."""

from slimquant.models.loading import EMBEDDED, LoadedModel, load_checkpoint, load_model, resolve_embedded

__all__ = ["EMBEDDED", "LoadedModel", "load_model", "load_checkpoint", "resolve_embedded"]
