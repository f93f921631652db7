"""Model families. Importing this package registers every model (see `vitforge.models.registry`)."""

import vitforge.models.backbones  # noqa: F401
import vitforge.models.cait  # noqa: F401
import vitforge.models.cct  # noqa: F401
import vitforge.models.cnn  # noqa: F401
import vitforge.models.deit  # noqa: F401
import vitforge.models.mambavision  # noqa: F401
import vitforge.models.sclusterformer  # noqa: F401
from vitforge.models import vit  # noqa: F401
