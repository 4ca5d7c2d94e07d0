"""Method families; importing this package registers every method."""

from . import exact, kernel, lowrank, hybrid, nystrom, gaussian  # noqa: F401  (registration order = listing order)
