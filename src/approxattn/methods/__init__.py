"""Method families; importing this package registers every method."""

from . import exact, kernel, lowrank, hybrid  # noqa: F401  (registration order = listing order)
