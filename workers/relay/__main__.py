"""`python -m workers.relay`: set up Django, then deliver outbox rows until SIGTERM or SIGINT."""

import os
import sys

import django

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    django.setup()
    # Imported only now: the relay uses the Django models, which need the app registry set up first.
    from controlplane.observability import setup_tracing
    from fednested.observability.tracing import RELAY
    from workers.relay.relay import main

    setup_tracing(RELAY)

    sys.exit(main(sys.argv[1:]))
