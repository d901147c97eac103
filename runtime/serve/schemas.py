"""The JSON bodies of the API (pydantic), and the request-body schemas that accept two media types."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IMAGE_NOTE = "base64 of the image file's bytes (a data: URL prefix is allowed)"
PATCHES_NOTE = ("registry ids (digests or names), applied in this order on the base; "
                "omit for the server's default set, [] for no patches at all")


class ClassifyJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, description=IMAGE_NOTE)
    labels: list[str] = Field(min_length=1)
    templates: list[str] | None = Field(default=None, description="prompt templates with {} once; default 'a photo of a {}.'")
    patches: list[str] | None = Field(default=None, description=PATCHES_NOTE)
    top_k: int = Field(default=5, ge=1, le=1000)


class EmbedImageJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, description=IMAGE_NOTE)
    patches: list[str] | None = Field(default=None, description=PATCHES_NOTE)


class EmbedTextJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1)
    patches: list[str] | None = Field(default=None, description=PATCHES_NOTE)


class DefaultPatches(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patches: list[str] = Field(description="registry ids in order; [] serves the base")


def _multipart(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_STRINGS = {"type": "array", "items": {"type": "string"}}


def body(json_model: type[BaseModel] | None, multipart: dict[str, Any] | None) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself (JSON and/or multipart)."""
    content: dict[str, Any] = {}
    if json_model is not None:
        content["application/json"] = {"schema": json_model.model_json_schema()}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": True, "content": content}}


CLASSIFY_BODY = body(ClassifyJSON, _multipart(
    {"images": _FILES, "labels": _STRINGS, "templates": _STRINGS, "patches": _STRINGS,
     "top_k": {"type": "integer", "minimum": 1, "maximum": 1000}}, ["images", "labels"]))
_QUERY_LIST = {"type": "array", "items": {"type": "string"}}
CLASSIFY_BINARY = {
    "parameters": [
        {"name": "labels", "in": "query", "required": True, "style": "form", "explode": True, "schema": _QUERY_LIST,
         "description": "the labels to classify over (repeat the parameter: labels=seven&labels=one)"},
        {"name": "templates", "in": "query", "required": False, "style": "form", "explode": True, "schema": _QUERY_LIST,
         "description": "prompt templates with {} once; default 'a photo of a {}.'"},
        {"name": "patches", "in": "query", "required": False, "style": "form", "explode": True, "schema": _QUERY_LIST,
         "description": PATCHES_NOTE.replace("[] for", "one empty value (patches=) for")},
        {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
        {"name": "X-Image-Lengths", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": "^[0-9]+( *, *[0-9]+)*$"},
         "description": "the byte length of each image, in order, when the body holds several images one after "
                        "the other (they add up to the body's length); without it the body is one image"},
    ],
    "requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}},
}
EMBED_TEXT_BODY = body(EmbedTextJSON, None)
DEFAULT_PATCHES_BODY = body(DefaultPatches, None)
EMBED_IMAGE_BODY = body(EmbedImageJSON, _multipart({"images": _FILES, "patches": _STRINGS}, ["images"]))
UPLOAD_BODY = body(None, _multipart({"file": {"type": "string", "format": "binary"},
                                     "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}}, ["file"]))

ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "status": {"type": "integer"}, "message": {"type": "string"}}}}}}}}
ERRORS = {str(code): {"description": text, **ERROR} for code, text in (
    (400, "malformed request"), (413, "over a size limit"), (415, "unsupported media type or image format"),
    (422, "invalid input (labels, patch ids, a patch that does not fit)"), (503, "overloaded: retry after Retry-After seconds"))}
ADMIN_ERRORS = {**ERRORS, **{str(code): {"description": text, **ERROR} for code, text in (
    (401, "no admin token"), (403, "wrong admin token, or admin routes disabled"), (404, "no such patch"),
    (409, "the patch is in the default set"),
    (503, "overloaded (retry after Retry-After seconds), or the registry folder or its index unusable"))}}
