"""fednested: federated, multi-timescale training of Mixture-of-Experts language models (pure PyTorch core).

This package never imports Django: it is shared by the control plane's workers, Tier-1 and the edge client.
"""

__version__ = "0.1.0"
