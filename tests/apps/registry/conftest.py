"""Fixtures of a control plane with a real tiny base version in a per-test artifact store (federation_world)."""

from tests.federation_world import base_template, make_update, world

__all__ = ["base_template", "make_update", "world"]
