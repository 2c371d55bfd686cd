"""Django apps of the control plane, one per domain: accounts, registry, federation, governance."""
