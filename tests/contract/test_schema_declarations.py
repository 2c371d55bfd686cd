"""What the published schema declares, checked against what the code does, including what no generated request
reaches: read-only related fields over nullable foreign keys are nullable; each operation documents the errors the
framework can answer; error bodies as controlplane/api_errors.py builds them validate against the error schemas;
the constraints published are the ones the server enforces."""

import importlib
import inspect
from typing import Any

import jsonschema
import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import RegexValidator
from django.db import models
from drf_spectacular.generators import SchemaGenerator
from rest_framework import serializers
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.exceptions import ValidationError as DrfValidationError

from controlplane.api_errors import exception_handler
from fednested.messaging.schemas import CLIENT_ID_REGEX, UpdateEnvelope

API_SERIALIZER_MODULES = ("apps.accounts", "apps.federation", "apps.governance", "apps.registry", "apps.schedules")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return SchemaGenerator().get_schema(request=None, public=True)


def model_serializers() -> list[type[serializers.ModelSerializer[Any]]]:
    found = []
    for app in API_SERIALIZER_MODULES:
        module = importlib.import_module(f"{app}.api.serializers")
        found += [
            value
            for value in vars(module).values()
            if inspect.isclass(value)
            and issubclass(value, serializers.ModelSerializer)
            and value.__module__ == module.__name__
        ]
    return found


def nullable_related_fields() -> list[tuple[str, str]]:
    """(component, field) of every read-only related field whose foreign key is nullable, in every API serializer."""
    found = []
    for serializer_class in model_serializers():
        model = serializer_class.Meta.model
        for name, field in serializer_class().fields.items():
            if not isinstance(field, serializers.RelatedField) or not field.read_only:
                continue
            model_field = model._meta.get_field(field.source)
            if isinstance(model_field, models.ForeignKey) and model_field.null:
                found.append((serializer_class.__name__.removesuffix("Serializer"), name))
    return found


def test_every_read_only_related_field_over_a_nullable_foreign_key_is_published_nullable(
    schema: dict[str, Any],
) -> None:
    fields = nullable_related_fields()
    # The ones the issue found served as null, and the rest of their kind.
    assert {
        ("EdgeDevice", "current_version"),
        ("TrainingTask", "created_by"),
        ("ModelVersion", "parent"),
        ("VersionEvaluation", "parent_version"),
        ("LineageEdge", "source_version"),
        ("Round", "candidate"),
        ("Round", "opened_by"),
    } <= set(fields)
    components = schema["components"]["schemas"]
    not_nullable = [
        f"{component}.{name}"
        for component, name in fields
        if not components[component]["properties"][name].get("nullable")
    ]
    assert not_nullable == []


def test_optional_nested_objects_are_nullable(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    assert components["ApprovalRequest"]["properties"]["decision"]["nullable"] is True
    assert components["Update"]["properties"]["rejection"]["nullable"] is True
    assert components["EnrollmentResult"]["properties"]["ca_certificate"]["nullable"] is True


def test_every_operation_documents_the_errors_the_framework_can_answer(schema: dict[str, Any]) -> None:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            where = f"{method.upper()} {path}"
            assert "406" in statuses, where
            if path != "/api/v1/enroll/":
                assert {"401", "403"} <= statuses, where
            if "{" in path:
                assert "404" in statuses, where
            if method in ("post", "put"):
                assert {"400", "413"} <= statuses, where
            for status, response in operation["responses"].items():
                if status >= "400":
                    assert "schema" in response["content"]["application/json"], f"{where} {status}"
    assert "401" not in schema["paths"]["/api/v1/enroll/"]["post"]["responses"]
    updates = schema["paths"]["/api/v1/updates/"]["post"]["responses"]
    assert {"400", "401", "403", "409", "413", "415", "422"} <= set(updates)
    refusal = {"$ref": "#/components/schemas/UpdateRefusal"}
    assert refusal in updates["403"]["content"]["application/json"]["schema"]["anyOf"]
    assert schema["components"]["schemas"]["UpdateRefusal"]["properties"]["code"] == {
        "$ref": "#/components/schemas/RejectionCodeEnum"
    }


def body_of(error: Exception) -> Any:
    response = exception_handler(error, {})
    assert response is not None
    return response.data


@pytest.mark.parametrize(
    ("error", "component"),
    [
        (ParseError("malformed JSON at line 1 column 2", code="malformed_json"), "Error"),
        (NotFound(), "NotFoundError"),
        (DjangoValidationError(["one problem", "another"], code="conflict"), "Error"),
        (DjangoValidationError({"token": DjangoValidationError("used", code="token_used")}), "FieldErrors"),
        (DrfValidationError({"artifacts": [{}, {"sha256": ["not hex"]}], "labels": {"0": ["blank"]}}), "FieldErrors"),
        (DrfValidationError({"code": ["too long"]}), "FieldErrors"),
    ],
)
def test_error_bodies_validate_against_the_published_error_schemas(
    schema: dict[str, Any], error: Exception, component: str
) -> None:
    body = body_of(error)
    document = {"$ref": f"#/components/schemas/{component}", "components": schema["components"]}
    jsonschema.Draft4Validator(document).validate(body)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(document).validate({key: value for key, value in body.items() if key != "code"})


def test_published_constraints_are_the_enforced_ones(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    assert components["EnrollRequest"]["properties"]["client_id"]["pattern"] == CLIENT_ID_REGEX
    envelope = schema["paths"]["/api/v1/updates/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    wire = UpdateEnvelope.model_json_schema(mode="validation")
    assert envelope["properties"]["client_id"]["pattern"] == wire["properties"]["client_id"]["pattern"]
    assert envelope["properties"]["examples"]["maximum"] == wire["properties"]["examples"]["maximum"]
    assert {"schema", "schema_version", "update_id", "payload"} <= set(envelope["required"])
    assert envelope["properties"]["round_id"]["nullable"] is True
    family = serializers_field("apps.registry.api.serializers", "ModelFamilySerializer", "name")
    with pytest.raises(serializers.ValidationError, match="lowercase slug"):
        family.run_validation("Tiny MoE")
    [pattern] = [validator.regex.pattern for validator in family.validators if isinstance(validator, RegexValidator)]
    assert components["ModelFamilyRequest"]["properties"]["name"]["pattern"] == pattern


def serializers_field(module: str, serializer: str, name: str) -> serializers.Field[Any, Any, Any, Any]:
    return getattr(importlib.import_module(module), serializer)().fields[name]
