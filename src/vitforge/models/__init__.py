"""Model families. Importing this package registers every model (see `vitforge.registry`)."""

from vitforge.models import vit  # noqa: F401
