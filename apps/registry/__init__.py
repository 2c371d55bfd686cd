"""Registry: model families, immutable model versions with their artifacts and lineage, and movable aliases."""
