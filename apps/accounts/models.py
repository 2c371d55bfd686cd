"""Accounts models: the project's user (with a role) and hashed API tokens."""

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models

from apps.accounts.choices import Role


class User(AbstractUser):
    """A person or an edge device that authenticates; `role` decides what it may do (empty: nothing at all)."""

    role = models.CharField(max_length=16, choices=Role.choices, blank=True, default="", db_index=True)

    def __str__(self) -> str:
        return f"{self.username} ({self.role or 'no role'})"


class ApiToken(models.Model):
    """A bearer credential for the REST API. Only its SHA-256 is stored; the plaintext is shown once, at issue."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. 'laptop' or 'enrollment'.")
    key_prefix = models.CharField(max_length=16, help_text="First characters of the token, to tell tokens apart.")
    key_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"{self.key_prefix}… ({self.user.username}, {self.name})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None
