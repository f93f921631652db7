"""vitforge: from a folder of images to a trained, evaluated and exported vision-transformer classifier."""

from vitforge.errors import VitforgeError
from vitforge.registry import create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["VitforgeError", "create_model", "list_models", "register_model", "__version__"]
