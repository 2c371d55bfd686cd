"""Deployment of the federation's edge: the HAProxy config that terminates mTLS in front of the control plane, and
the WireGuard configs that join sites to the hub. Pure renderers over dataclass options; the CLI writes the files."""
