"""``.cog/openapi_schema.json`` from ``predict.py``, through cog's own inspector.

coglet validates inputs and serves ``/openapi.json`` only when this file exists; ``cog
build`` writes it in the image. Without Docker we write it with the same layout as
cog's generator (OpenAPI 3.0.2: Input, Output, one enum schema per choices field,
the prediction envelope and paths).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import yaml

SCHEMA_PATH = Path(".cog/openapi_schema.json")


def cog_yaml_environment(path: str | Path = "cog.yaml") -> dict[str, str]:
    """The ``environment`` entries of cog.yaml, which the image sets before importing predict.py."""
    entries = yaml.safe_load(Path(path).read_text()).get("environment") or []
    return dict(entry.split("=", 1) for entry in entries)


def predictor_info(predictor_ref: str = "predict.py:Predictor"):
    """cog's own description of the predictor's inputs and output (``cog._inspector``)."""
    from cog import _inspector

    module, name = predictor_ref.split(":")
    return _inspector.create_predictor(module.removesuffix(".py"), name)


def openapi_schema(predictor_ref: str = "predict.py:Predictor") -> dict:
    info = predictor_info(predictor_ref)
    properties, required, enums = {}, [], {}
    for field in sorted(info.inputs.values(), key=lambda f: f.order):
        prop: dict = {"x-order": field.order}
        if field.choices:
            enums[field.name] = {"title": field.name, "description": "An enumeration.",
                                 "enum": list(field.choices), **field.type.primitive.json_type()}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
        else:
            prop["title"] = field.name.replace("_", " ").title()
            prop.update(field.type.json_type())
        nullable = field.type.repetition.name.startswith("OPTIONAL")
        if field.default is not None:
            prop["default"] = field.default
        elif not nullable:
            required.append(field.name)
        if nullable:
            prop["nullable"] = True
        for key, value in (("description", field.description), ("minimum", field.ge), ("maximum", field.le)):
            if value is not None:
                prop[key] = value
        properties[field.name] = prop
    schemas = {"Input": {"title": "Input", "type": "object", "properties": properties, "required": required},
               "Output": info.output.json_type(), **enums, **_ENVELOPE}
    paths = json.loads(json.dumps(_PATHS))
    if _is_streaming(Path(f"{info.module_name}.py"), info.predictor_name):
        paths["/predictions"]["post"]["x-cog-streaming"] = True  # coglet serves SSE only with this
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"}, "paths": paths,
            "components": {"schemas": schemas}}


def _is_streaming(module_file: Path, class_name: str) -> bool:
    """Whether run()/predict() carries ``@cog.streaming`` (a no-op at runtime, so read the source)."""
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return any(isinstance(fn, ast.FunctionDef) and fn.name in ("run", "predict") and any(
                ast.unparse(d).split("(")[0] in ("streaming", "cog.streaming") for d in fn.decorator_list)
                for fn in node.body)
    return False


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    os.environ.update({k: v for k, v in cog_yaml_environment().items() if k not in os.environ})
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(openapi_schema(), indent=2) + "\n")
    return path


_REF = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
_JSON = lambda schema: {"content": {"application/json": {"schema": schema}}}  # noqa: E731
_OK = {"200": {"description": "Successful Response", **_JSON({})}}
_INVALID = {"422": {"description": "Validation Error", **_JSON(_REF("HTTPValidationError"))}}
_TIME = {"type": "string", "format": "date-time"}
_ENVELOPE = {
    "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
        "id": {"title": "Id", "type": "string"}, "input": _REF("Input")}},
    "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
        "input": _REF("Input"), "output": _REF("Output"), "id": {"title": "Id", "type": "string"},
        "version": {"title": "Version", "type": "string"}, "created_at": {"title": "Created At", **_TIME},
        "started_at": {"title": "Started At", **_TIME}, "completed_at": {"title": "Completed At", **_TIME},
        "status": {"title": "Status", "type": "string"}, "error": {"title": "Error", "type": "string"},
        "logs": {"title": "Logs", "type": "string"}, "metrics": {"title": "Metrics", "type": "object"}}},
    "Status": {"title": "Status", "description": "An enumeration.", "type": "string",
               "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
    "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
        "detail": {"title": "Detail", "type": "array", "items": _REF("ValidationError")}}},
    "ValidationError": {"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                        "properties": {"loc": {"title": "Location", "type": "array",
                                               "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                                       "msg": {"title": "Message", "type": "string"},
                                       "type": {"title": "Error Type", "type": "string"}}},
}
_PATHS = {
    "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": _OK}},
    "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                              "responses": _OK}},
    "/predictions": {"post": {"summary": "Predict", "description": "Run a single prediction on the model",
                              "operationId": "predict_predictions_post",
                              "requestBody": _JSON(_REF("PredictionRequest")),
                              "responses": {"200": {"description": "Successful Response",
                                                    **_JSON(_REF("PredictionResponse"))}, **_INVALID}}},
    "/predictions/{prediction_id}/cancel": {"post": {
        "summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post",
        "parameters": [{"required": True, "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id", "in": "path"}],
        "responses": {**_OK, **_INVALID}}},
}
