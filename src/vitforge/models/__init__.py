"""Model families. Importing this package registers every model (see `vitforge.models.registry`)."""

import vitforge.models.backbones  # noqa: F401
import vitforge.models.cait  # noqa: F401
import vitforge.models.cct  # noqa: F401
import vitforge.models.cnn  # noqa: F401
import vitforge.models.deit  # noqa: F401
import vitforge.models.sclusterformer  # noqa: F401
from vitforge.models import vit  # noqa: F401
from vitforge.models.mambavision import create_mambavision_base, create_mambavision_small, create_mambavision_tiny

__all__ = ["create_mambavision_tiny", "create_mambavision_small", "create_mambavision_base"]
