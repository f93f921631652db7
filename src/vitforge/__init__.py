"""vitforge: from a folder of images to a trained, evaluated and exported vision-transformer classifier."""

from vitforge.errors import VitforgeError
from vitforge.models.registry import create_model, list_models, register_model
from vitforge.version import __version__

__all__ = ["VitforgeError", "create_model", "list_models", "register_model", "__version__"]
