"""The request bodies that routes parse themselves (JSON, or multipart with image files), in the OpenAPI schema.

FastAPI describes only the bodies it validates itself. The classify, similarity, search and add-pairs routes read the
request and validate it with a pydantic model, so their ``openapi_extra`` names that model by reference
(:func:`body_doc`) and :func:`install` adds every model so named, and the models it nests, to the schema's
components: no reference in ``/openapi.json`` dangles.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"
_JSON_BODIES: dict[str, type[BaseModel]] = {}  # the models body_doc named, by schema name


def body_doc(json_model: type[BaseModel], multipart: dict[str, Any]) -> dict[str, Any]:
    """A route's ``openapi_extra``: a required body, either JSON (``json_model``) or multipart (``multipart``, a
    JSON schema of the form fields)."""
    _JSON_BODIES[json_model.__name__] = json_model
    ref = REF_TEMPLATE.format(model=json_model.__name__)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": ref}},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` add the models named by :func:`body_doc` to the schema's components (once: FastAPI
    caches the schema)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in sorted(_JSON_BODIES.items()):
            model_schema = model.model_json_schema(ref_template=REF_TEMPLATE)
            for nested, nested_schema in model_schema.pop("$defs", {}).items():
                components.setdefault(nested, nested_schema)
            components.setdefault(name, model_schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
