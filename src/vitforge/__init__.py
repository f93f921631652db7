"""vitforge: from a folder of images to a trained, evaluated and exported vision-transformer classifier."""

from vitforge.errors import VitforgeError
from vitforge.models import create_mambavision_base, create_mambavision_small, create_mambavision_tiny
from vitforge.models.registry import create_model, list_models, register_model
from vitforge.version import __version__

__all__ = ["VitforgeError", "create_model", "list_models", "register_model", "create_mambavision_tiny",
           "create_mambavision_small", "create_mambavision_base", "__version__"]
