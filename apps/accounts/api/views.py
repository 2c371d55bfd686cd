"""REST views of accounts: who am I (so clients can check their token and role)."""

from typing import ClassVar, cast

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.api.serializers import MeSerializer
from apps.accounts.choices import Role
from apps.accounts.models import User


class MeView(APIView):
    """The authenticated user's name and role (and client id for devices)."""

    action_roles: ClassVar[dict[str, frozenset[Role]]] = {"get": frozenset(Role)}

    @extend_schema(responses=MeSerializer)
    def get(self, request: Request) -> Response:
        return Response(MeSerializer(cast(User, request.user)).data)
