"""`python -m workers.ingest`: set up Django, then run the ingest loop until SIGTERM or SIGINT."""

import os
import sys

import django

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    django.setup()
    # Imported only now: the consumer uses the Django models, which need the app registry set up first.
    from controlplane.observability import setup_tracing
    from fednested.observability.tracing import WORKER_INGEST
    from workers.ingest.consumer import main

    setup_tracing(WORKER_INGEST)

    sys.exit(main(sys.argv[1:]))
