"""REST serializers of accounts."""

from rest_framework import serializers

from apps.accounts.models import User


class MeSerializer(serializers.ModelSerializer[User]):
    client_id = serializers.SerializerMethodField()

    class Meta:
        model = User
        fields = ("username", "role", "client_id")
        read_only_fields = fields

    def get_client_id(self, user: User) -> str | None:
        device = getattr(user, "edge_device", None)
        return device.client_id if device is not None else None
