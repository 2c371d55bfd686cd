"""`python -m workers.telemetry`: set up Django, then run the data engine's loop until SIGTERM or SIGINT."""

import os
import sys

import django

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    django.setup()
    # Imported only now: the consumer uses the Django models, which need the app registry set up first.
    from workers.telemetry.consumer import main

    sys.exit(main(sys.argv[1:]))
