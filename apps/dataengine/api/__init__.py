"""REST API of the data engine (mounted under /api/v1/data-engine/)."""
