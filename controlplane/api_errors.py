"""REST API error mapping: services raise Django's ValidationError; clients get a 400 naming the field and problem.

Every single-message error body is `{"detail": "...", "code": "..."}` (docs/api/device-protocol.md "Errors"), so a
device can act on the machine code (e.g. `not_owner`) and show the operator the message.
"""

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework.exceptions import APIException
from rest_framework.exceptions import ValidationError as DrfValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus service-layer `django.core.exceptions.ValidationError` → 400 with the same messages."""
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "error_dict"):
            detail: Any = {field: [str(m) for m in errors] for field, errors in exc.message_dict.items()}
            # A service that gives its error a machine code (e.g. enrollment's `token_used`) gets it to the client.
            codes = {error.code for errors in exc.error_dict.values() for error in errors if error.code}
            if len(codes) == 1 and "code" not in detail:
                detail["code"] = codes.pop()
        else:
            detail = {"detail": exc.messages}
        exc = DrfValidationError(detail=detail, code=getattr(exc, "code", None) or "invalid")
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, APIException) and isinstance(response.data, dict):
        api_codes = exc.get_codes()
        if "detail" in response.data and "code" not in response.data and isinstance(api_codes, str):
            response.data["code"] = api_codes
    return response
