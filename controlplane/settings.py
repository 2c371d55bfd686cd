"""Django settings for the fednested control plane (placeholder until the control-plane foundation lands)."""

SECRET_KEY = "placeholder"
INSTALLED_APPS: list[str] = []
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
