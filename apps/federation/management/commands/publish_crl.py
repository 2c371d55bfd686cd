"""`manage.py publish_crl`: write the CRL now (before HAProxy first starts, or after restoring the database)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.federation.identity import publish_crl


class Command(BaseCommand):
    help = "Write the federation CA's CRL to FEDNESTED_CRL_PATH (and load it into HAProxy if its socket is set)."

    def handle(self, *args: Any, **options: Any) -> None:
        path = publish_crl()
        if path is None:
            raise CommandError("no CA configured: set FEDNESTED_CA_DIR (and FEDNESTED_CRL_PATH) first")
        self.stdout.write(f"wrote {path}")
