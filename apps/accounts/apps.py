"""App configuration for apps.accounts."""

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "apps.accounts"
    label = "accounts"
    verbose_name = "Accounts"

    def ready(self) -> None:
        # Connects the failed sign-in receiver (apps.accounts.refusals): Django reports those only by signal.
        from apps.accounts import refusals  # noqa: F401
