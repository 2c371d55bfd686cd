"""The OpenAPI schema's error responses: every operation documents the error statuses it can really return, with the
JSON body controlplane/api_errors.py gives them, so clients (and the contract test) can rely on the schema for 4xx too.

drf-spectacular documents only what views declare; the errors that come from the framework (authentication, roles,
content negotiation, parsing, filters, lookups, pagination, the ASGI body limit) are added here from what the view
is made of, and merged with the errors a view declares itself (e.g. UpdateViewSet.create's refusals).
"""

from typing import Any

from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.openapi import AutoSchema
from rest_framework.exceptions import NotAcceptable, NotFound, UnsupportedMediaType
from rest_framework.permissions import AllowAny

from controlplane.api_errors import FIELD_ERRORS_CODE
from fednested.infra.haproxy import PAYLOAD_TOO_LARGE
from fednested.messaging.schemas import EventModel

JSON = "application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# The bodies of controlplane/api_errors.py, as schemas. `detail` is one message, or a list when a service raised a
# ValidationError with several messages (`with_code` keeps a list of field errors as they are).
_MESSAGES: dict[str, Any] = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"anyOf": [{"type": "string"}, _ref("NestedFieldErrors")]}},
    ]
}


def _problem(description: str, codes: list[str] | None = None) -> dict[str, Any]:
    code: dict[str, Any] = {"type": "string"}
    if codes is not None:
        code["enum"] = codes
    return {
        "type": "object",
        "description": description,
        "properties": {"detail": _MESSAGES, "code": code},
        "required": ["detail", "code"],
    }


ERROR_COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": _problem(
        "One problem: what was wrong (`detail`) and a machine code (`code`), e.g. `not_authenticated`, "
        "`permission_denied`, `not_owner`, `malformed_json`."
    ),
    "NotFoundError": _problem("No such object (or none you may see), no such page or file.", [NotFound.default_code]),
    "NotAcceptableError": _problem(
        "The Accept header names no media type the operation answers.", [NotAcceptable.default_code]
    ),
    "UnsupportedMediaTypeError": _problem(
        "The request body's Content-Type is not one the operation reads.", [UnsupportedMediaType.default_code]
    ),
    "PayloadTooLargeError": _problem(
        "The request body is larger than the route accepts (refused before it is read).", [PAYLOAD_TOO_LARGE]
    ),
    "FieldErrors": {
        "type": "object",
        "description": "Errors per field: each field names its messages (nested fields and list items their own "
        f"errors); `code` is `{FIELD_ERRORS_CODE}`, or the service's own code when it gave one (e.g. `token_used`).",
        "properties": {"code": {"type": "string"}},
        "required": ["code"],
        "additionalProperties": _ref("FieldError"),
    },
    "FieldError": {
        "description": "The messages of one field; a nested field or list names its own errors (by field or index).",
        "anyOf": [
            {"type": "array", "items": {"anyOf": [{"type": "string"}, _ref("NestedFieldErrors")]}},
            _ref("NestedFieldErrors"),
        ],
    },
    "NestedFieldErrors": {"type": "object", "additionalProperties": _ref("FieldError")},
}

BAD_REQUEST: dict[str, Any] = {"anyOf": [_ref("Error"), _ref("FieldErrors")]}
DESCRIPTIONS = {
    "400": "The request is malformed (`malformed_json`, `too_deep`, `too_large`, …) or a field, parameter or filter "
    "is invalid (field errors).",
    "401": "No credentials, or unknown, revoked or unusable ones (`not_authenticated`, `authentication_failed`, …).",
    "403": "Your role may not do this (`permission_denied`), or the object is not yours to act on.",
    "404": "Not found.",
    "406": "Not acceptable.",
    "413": "Request body too large.",
    "415": "Unsupported media type.",
}


# What `fednested.messaging.decode` reads to pick the event's model: required on the wire whatever the model says.
DISCRIMINATOR_FIELDS = ("schema", "schema_version")


def wire_schema(model: type[EventModel]) -> dict[str, Any]:
    """The JSON schema of a wire event (fednested.messaging.schemas), as an OpenAPI 3.0 schema: the API that takes an
    event as JSON publishes the constraints the wire schema enforces, from that one declaration."""
    schema = model.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
    definitions = schema.pop("$defs", {})
    converted: dict[str, Any] = _openapi_30(schema, definitions)
    converted["required"] = sorted({*converted.get("required", ()), *DISCRIMINATOR_FIELDS})
    return converted


def _openapi_30(node: Any, definitions: dict[str, Any]) -> Any:
    """`node` (JSON Schema 2020-12, as pydantic writes it) in the OpenAPI 3.0 dialect, references inlined."""
    if isinstance(node, list):
        return [_openapi_30(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _openapi_30(definitions[node["$ref"].rsplit("/", 1)[-1]], definitions)
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue  # pydantic's field titles repeat the property names
        if key == "anyOf" and {"type": "null"} in value:
            rest = [option for option in value if option != {"type": "null"}]
            result.update(_openapi_30(rest[0], definitions) if len(rest) == 1 else {"anyOf": rest})
            result["nullable"] = True
        elif key == "const":
            result["enum"] = [value]
        elif key == "exclusiveMinimum":
            result.update({"minimum": value, "exclusiveMinimum": True})
        elif key == "patternProperties":
            # OpenAPI 3.0 has no patternProperties: the values' schema stays, the keys' pattern is described.
            [(pattern, values)] = value.items()
            result["additionalProperties"] = _openapi_30(values, definitions)
            result["description"] = f"{node.get('description', '')} Keys match {pattern}.".strip()
        elif key == "propertyNames":
            continue
        else:
            result[key] = _openapi_30(value, definitions)
    return result


class ErrorDocumentingAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema, plus the error responses each operation can return (see the module doc)."""

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        for status, schema in self.possible_errors().items():
            _merge(responses, status, schema)
        # Statuses a view declares with a description only (e.g. the file route's 500) get the error body too.
        for status, response in responses.items():
            if status >= "400" and "content" not in response:
                _merge(responses, status, _ref("Error"))
        return dict(sorted(responses.items()))

    def possible_errors(self) -> dict[str, dict[str, Any]]:
        """Status → body schema of the errors the framework can answer for this operation."""
        errors: dict[str, dict[str, Any]] = {"406": _ref("NotAcceptableError")}
        if not all(isinstance(permission, AllowAny) for permission in self.view.get_permissions()):
            # RolePermission: no credentials is 401; a role that may not (an outsider has none) is 403.
            errors["401"] = _ref("Error")
            errors["403"] = _ref("Error")
        if "{" in self.path or (self._is_list_view() and getattr(self.view, "pagination_class", None) is not None):
            # A lookup that finds nothing visible to the caller; a page number past the last page.
            errors["404"] = _ref("NotFoundError")
        if self.method in BODY_METHODS:
            errors["400"] = BAD_REQUEST
            # The ASGI limiter (controlplane/limits.py) refuses a body over the route's limit before any view.
            errors["413"] = _ref("PayloadTooLargeError")
            if JSON in self._request_media_types():
                errors["415"] = _ref("UnsupportedMediaTypeError")
        if self._filters_requests():
            errors["400"] = BAD_REQUEST
        return errors

    def _request_media_types(self) -> list[str]:
        """What the operation's body may be: the media types a view declares, else those its parsers read."""
        declared = self.get_request_serializer()
        if isinstance(declared, dict):
            return list(declared)
        return [parser.media_type for parser in self.view.get_parsers()]

    def _filters_requests(self) -> bool:
        """Whether DjangoFilterBackend validates this operation's query (list and detail routes alike: get_object
        filters too), so a bad filter value is a 400 with field errors."""
        return getattr(self.view, "filterset_class", None) is not None and any(
            issubclass(backend, DjangoFilterBackend) for backend in getattr(self.view, "filter_backends", ())
        )


def _merge(responses: dict[str, Any], status: str, schema: dict[str, Any]) -> None:
    """Add `schema` as a JSON body of `status`; a body the view declared for it stays, as one alternative."""
    response = responses.setdefault(status, {"description": ""})
    if not response.get("description"):
        response["description"] = DESCRIPTIONS.get(status, "Error.")
    media = response.setdefault("content", {}).setdefault(JSON, {})
    declared = media.get("schema")
    if declared is None:
        media["schema"] = schema
        return
    alternatives = _alternatives(declared)
    alternatives += [option for option in _alternatives(schema) if option not in alternatives]
    media["schema"] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def _alternatives(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return list(schema["anyOf"]) if set(schema) == {"anyOf"} else [schema]


def add_error_components(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Postprocessing hook (after drf-spectacular's enum hook, which would move the error codes' one-value enums into
    components of their own): the error body schemas the operations refer to."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(ERROR_COMPONENTS)
    result["components"]["schemas"] = dict(sorted(schemas.items()))
    return result
