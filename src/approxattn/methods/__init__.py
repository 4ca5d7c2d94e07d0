"""Method families; importing this package registers every method."""

from . import exact, kernel, lowrank, hybrid, nystrom, gaussian, sparse  # noqa: F401  (registration order = listing order)
