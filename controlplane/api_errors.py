"""REST API error bodies: services raise Django's ValidationError; clients get a 400 naming the field and problem.

Every error body of the API is a JSON object with a top-level `code` (docs/api/device-protocol.md "Errors"), so a
device can act on the machine code (e.g. `not_owner`) and show the operator the message: `{"detail": "...",
"code": "..."}` for one problem, `{"<field>": ["..."], ..., "code": "invalid"}` for field errors. That holds for
what Django answers outside the views too (unknown URLs, 500s): `handler404` and friends answer JSON under /api/
and Django's plain HTML pages elsewhere (the console), never a debug page.
"""

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework.exceptions import APIException, NotFound, PermissionDenied
from rest_framework.exceptions import ValidationError as DrfValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from apps.accounts.refusals import record_api_refusal, record_console_refusal

# Where the API lives (controlplane/urls.py mounts api/v1/ under it): requests there get JSON errors.
API_PATH_PREFIX = "/api/"
# The code of a body that lists field errors (the fields' own codes stay out of the body, as DRF has it).
FIELD_ERRORS_CODE = "invalid"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus service-layer `django.core.exceptions.ValidationError` → 400 with the same messages, and a
    top-level `code` in every body."""
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "error_dict"):
            detail: Any = {field: [str(m) for m in errors] for field, errors in exc.message_dict.items()}
            # A service that gives its error a machine code (e.g. enrollment's `token_used`) gets it to the client.
            codes = {error.code for errors in exc.error_dict.values() for error in errors if error.code}
            if len(codes) == 1 and "code" not in detail:
                detail["code"] = codes.pop()
        else:
            detail = {"detail": exc.messages}
        exc = DrfValidationError(detail=detail, code=getattr(exc, "code", None) or FIELD_ERRORS_CODE)
    elif isinstance(exc, Http404):
        exc = NotFound(*exc.args)  # as DRF's handler does, so that the body gets the code too
    elif isinstance(exc, DjangoPermissionDenied):
        exc = PermissionDenied(*exc.args)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, APIException):
        response.data = with_code(response.data, exc.get_codes())
        record_api_refusal(exc, context.get("request"), response.status_code)  # 401s and 403s join the audit trail
    return response


def with_code(body: Any, codes: Any) -> dict[str, Any]:
    """`body` (DRF's error body: a dict, a list, or a string) as an object with a string `code` at the top."""
    if isinstance(body, dict):
        data: dict[str, Any] = body
    else:
        messages = body if isinstance(body, list) else [body]
        single = len(messages) == 1 and not isinstance(messages[0], dict | list)
        data = {"detail": str(messages[0]) if single else messages}
    if not isinstance(data.get("code"), str):
        # A single problem carries its own code (`not_found`, `too_deep`); field errors are `invalid` as a whole.
        if isinstance(codes, dict) and set(codes) == {"detail"}:
            codes = codes["detail"]
        if isinstance(codes, list) and codes and all(isinstance(c, str) for c in codes) and len(set(codes)) == 1:
            codes = codes[0]
        only_detail = set(data) <= {"detail", "code"} and isinstance(codes, str)
        code = codes if only_detail else FIELD_ERRORS_CODE
        if "code" in data:
            # A field that is itself called `code` keeps its errors under a name that cannot clash.
            data["code_errors"] = data.pop("code")
        data["code"] = code
    return data


def is_api_request(request: HttpRequest) -> bool:
    return request.path_info.startswith(API_PATH_PREFIX)


def json_error(status: int, detail: str, code: str) -> JsonResponse:
    return JsonResponse({"detail": detail, "code": code}, status=status)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler400: a request Django refused before any view (bad Host header, body over the size limit, …)."""
    if not is_api_request(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return json_error(400, "the request body is larger than this server accepts", "too_large")
    return json_error(400, "the request could not be understood", "bad_request")


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler403, for what Django refuses outside the API's views (which answer their own 403s)."""
    record_console_refusal(request, str(exception), channel="web")  # e.g. the admin's refusals join the audit trail
    if not is_api_request(request):
        return defaults.permission_denied(request, exception)
    return json_error(403, "you may not do this", "permission_denied")


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler404: under /api/ a JSON body that names the path (and lists no routes); elsewhere Django's page."""
    if not is_api_request(request):
        return defaults.page_not_found(request, exception)
    return json_error(404, f"no API endpoint at {request.path_info[:200]!r}: see /api/v1/docs/", "not_found")


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: no traceback, settings or paths in the body; the log has them (Django logs every 500)."""
    if not is_api_request(request):
        return defaults.server_error(request)
    return json_error(500, "internal server error: the operators can find it in the server log", "server_error")
