"""`manage.py demo`: the whole federated loop on one machine — control plane, ingest worker and edge devices."""
