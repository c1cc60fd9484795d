"""Region features: the feature spec, the sharded feature store, and importers for existing feature files.

The public names are those of :mod:`components.features.store` (which re-exports the spec types);
importers live in :mod:`components.features.importers`.
"""

from .store import *  # noqa: F403
from .store import __all__ as __all__
