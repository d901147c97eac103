"""The FastAPI app: routes, limits, JSON errors, the page. The work itself is in ``service.py``.

Every error is JSON ``{"error": {"status": N, "message": "..."}}``: 400 malformed, 401/403 admin
token, 404 unknown patch, 409 patch in use, 413 over a limit, 415 media type or image format,
422 invalid input, 503 overloaded (with Retry-After), shutting down, or the registry folder or its
index unusable. Bodies are counted while they are read, whatever Content-Length says (a chunked
body is cut off at the limit), and no answer carries a server path. Nothing a client sends
produces a 500 (the schema fuzz test holds the app to it).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from forgetpack import __version__
from forgetpack.format.errors import ForgetpackError, PatchError, one_line
from runtime.preprocess import ImageTooLarge, UnsupportedImage
from runtime.serve import schemas
from runtime.serve.batching import Closed, Overloaded
from runtime.serve.config import ServeConfig, token_matches
from runtime.serve.fields import HTTPError, patch_ids, split_images, top_k_of
from runtime.serve.metrics import route_of
from runtime.serve.registry import PatchInUse, RegistryUnavailable, UnknownPatch
from runtime.serve.service import Service, TooLarge, Unsupported

PAGE = Path(__file__).with_name("page") / "index.html"
BINARY_TYPES = ("application/octet-stream", "")  # and image/*: the bytes are sniffed, only IMAGE_FORMATS decode
BINARY_QUERY = frozenset(("labels", "templates", "patches", "top_k"))


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def status_of(exc: ForgetpackError) -> int:
    """The one mapping from library errors to HTTP statuses."""
    for kind, status in ((TooLarge, 413), (ImageTooLarge, 413), (Unsupported, 415), (UnsupportedImage, 415),
                         (PatchInUse, 409), (RegistryUnavailable, 503)):
        if isinstance(exc, kind):
            return status
    return 422  # bad labels, unknown ids, a patch that does not fit or is not signed


def create_app(config: ServeConfig, service: Service | None = None) -> FastAPI:
    """The app for ``config`` (or around an existing ``service``, as the Ray deployment does)."""
    service = service or Service(config)
    limits = service.limits

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = True
        yield
        app.state.ready = False  # uvicorn has finished the accepted requests by now
        service.close()

    app = FastAPI(title="forgetpack serve", version=__version__, lifespan=lifespan,
                  description="Zero-shot CLIP classification where each request picks its forget patches.")
    app.state.service, app.state.ready = service, True

    # -- errors and metrics ------------------------------------------------------------

    def answer_error(request: Request, exc: Exception) -> JSONResponse:
        """The JSON answer to an error a route raises (``HANDLED``): the one mapping, for FastAPI's
        exception handlers and for the hot routes that ``ObserveMiddleware`` calls directly."""
        if isinstance(exc, HTTPError):
            return error(exc.status, exc.message, exc.headers)
        if isinstance(exc, Overloaded):
            service.metrics.overloaded.inc()
            return error(503, str(exc), {"Retry-After": str(exc.retry_after)})
        if isinstance(exc, Closed):
            return error(503, str(exc), {"Retry-After": "1"})
        if isinstance(exc, UnknownPatch) and request.method == "DELETE":
            return error(404, str(exc))
        assert isinstance(exc, ForgetpackError)
        return error(status_of(exc), one_line(exc, 500))

    async def _handled(request: Request, exc: Exception) -> JSONResponse:
        return answer_error(request, exc)

    for kind in HANDLED:
        app.add_exception_handler(kind, _handled)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, _validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    hot: dict[tuple[str, str], Any] = {}  # filled below: (method, path) -> route function
    app.add_middleware(ObserveMiddleware, service=service, hot=hot, answer_error=answer_error)

    # -- reading bodies ------------------------------------------------------------------

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit: every route that reads one calls this."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise HTTPError(413, f"request body over {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_form(request: Request, data: bytes) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            yield data

        parser = MultiPartParser(request.headers, stream(), max_files=limits.max_images + 1,
                                 max_fields=limits.max_labels + limits.max_templates + limits.max_patches + 8,
                                 max_part_size=limits.max_image_bytes)
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise HTTPError(400, f"malformed multipart body: {exc.message}") from None

    async def read_request(request: Request, model: type[BaseModel]) -> tuple[str, Any]:
        """("json", the validated model) or ("form", the parsed form), by Content-Type."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise HTTPError(415, f"Content-Type {kind[:60]!r}: send application/json (images in base64) or multipart/form-data")
        data = await read_body(request)
        if kind == "multipart/form-data":
            return "form", await read_form(request, data)
        try:
            return "json", model.model_validate_json(data)
        except ValidationError as exc:
            raise HTTPError(422, _validation_message(exc.errors())) from None

    async def read_json(request: Request, model: type[BaseModel]) -> Any:
        """A JSON body (read with ``read_body``), validated against ``model``."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", ""):
            raise HTTPError(415, f"Content-Type {kind[:60]!r}: send application/json")
        data = await read_body(request)
        try:
            return model.model_validate_json(data)
        except ValidationError as exc:
            raise HTTPError(422, _validation_message(exc.errors())) from None

    async def form_images(form: Any) -> list[bytes]:
        files = form.getlist("images")
        if any(isinstance(f, str) for f in files):
            raise HTTPError(422, "images: send each image as a file part")
        return [await f.read() for f in files]

    def form_list(form: Any, name: str) -> list[str] | None:
        values = form.getlist(name)
        if any(not isinstance(v, str) for v in values):
            raise HTTPError(422, f"{name}: send text fields, not files")
        return values or None

    def classify_fields(fields: Any) -> tuple[list[str], list[str] | None, list[str] | None, int]:
        """labels, templates, patches and top_k from multipart fields or query parameters (repeated
        ``labels``, ``templates``, ``patches``; one ``top_k``): one reading of them for both."""
        top_k = top_k_of(form_list(fields, "top_k"))
        labels = form_list(fields, "labels")
        if not labels:
            raise HTTPError(422, "labels: give at least one label")
        return labels, form_list(fields, "templates"), patch_ids(form_list(fields, "patches")), top_k

    # -- routes ----------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready to serve (503 while shutting down, or when the default patch set cannot load)",
             responses={"503": {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        if not app.state.ready:
            return error(503, "shutting down")
        problem = service.readiness()
        if problem is not None:
            return error(503, one_line(problem, 500))
        return JSONResponse({"status": "ready", "model": service.model.model_id})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        data, kind = service.metrics.render(len(service.states))
        return Response(data, media_type=kind)

    @app.get("/v1/info", summary="The served model, its default patch state and the limits")
    async def info() -> dict[str, Any]:
        return service.info()

    @app.post("/v1/classify", summary="Zero-shot classification under a per-request patch set",
              openapi_extra=schemas.CLASSIFY_BODY, responses=schemas.ERRORS)
    async def classify(request: Request) -> JSONResponse:
        kind, body = await read_request(request, schemas.ClassifyJSON)
        if kind == "json":
            return JSONResponse(await service.classify(_decode_b64(body.images), body.labels, body.templates, body.patches, body.top_k))
        labels, templates, patches, top_k = classify_fields(body)
        return JSONResponse(await service.classify(await form_images(body), labels, templates, patches, top_k))

    @app.post("/v1/classify/binary", summary="Zero-shot classification of raw image bytes (labels and patches in the query)",
              openapi_extra=schemas.CLASSIFY_BINARY, responses=schemas.ERRORS)
    async def classify_binary(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in BINARY_TYPES and not kind.startswith("image/"):
            raise HTTPError(415, f"Content-Type {kind[:60]!r}: send the image bytes as application/octet-stream "
                                 "(or image/png, image/jpeg, ...); JSON and multipart go to /v1/classify")
        query = request.query_params
        unknown = sorted(set(query) - BINARY_QUERY)
        if unknown:
            raise HTTPError(422, f"unknown query parameter {unknown[0][:40]!r}: use labels, templates, patches, top_k")
        labels, templates, patches, top_k = classify_fields(query)  # before the body is read
        images = split_images(await read_body(request), request.headers.getlist("x-image-lengths"), limits.max_images)
        return JSONResponse(await service.classify(images, labels, templates, patches, top_k))

    @app.post("/v1/embed/image", summary="L2-normalised image embeddings",
              openapi_extra=schemas.EMBED_IMAGE_BODY, responses=schemas.ERRORS)
    async def embed_image(request: Request) -> JSONResponse:
        kind, body = await read_request(request, schemas.EmbedImageJSON)
        images = _decode_b64(body.images) if kind == "json" else await form_images(body)
        return JSONResponse(await service.embed_images(images, body.patches if kind == "json" else form_list(body, "patches")))

    @app.post("/v1/embed/text", summary="L2-normalised text embeddings under a per-request patch set",
              openapi_extra=schemas.EMBED_TEXT_BODY, responses=schemas.ERRORS)
    async def embed_text(request: Request) -> JSONResponse:
        body = await read_json(request, schemas.EmbedTextJSON)
        return JSONResponse(await service.embed_texts(body.texts, body.patches))

    @app.get("/v1/patches", summary="The registered patches (metadata from the patch format) and the default set")
    async def list_patches() -> dict[str, Any]:
        return {"patches": service.registry.entries(), "default": list(service.registry.default)}

    def require_admin(request: Request) -> None:
        if config.admin_token is None:
            raise HTTPError(403, "admin routes are disabled: start the server with --admin-token-file")
        header = request.headers.get("authorization")
        if header is None:
            raise HTTPError(401, "admin token missing: send 'Authorization: Bearer TOKEN'", {"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token_matches(token.strip(), config.admin_token):
            raise HTTPError(403, "wrong admin token")

    @app.post("/v1/patches", status_code=201, summary="Upload a patch (admin)", openapi_extra=schemas.UPLOAD_BODY,
              responses=schemas.ADMIN_ERRORS)
    async def upload(request: Request) -> dict[str, Any]:
        require_admin(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise HTTPError(415, "upload a patch as multipart/form-data with a 'file' part (and an optional 'name')")
        form = await read_form(request, await read_body(request))
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise HTTPError(422, "file: attach the patch file as a file part named 'file'")
        name = form.get("name")
        if name is not None and not isinstance(name, str):
            raise HTTPError(422, "name: a text field")
        data = await file.read()
        try:
            patch = service.upload(data, name)  # an empty name is refused there (422), not taken as none
        except PatchError as exc:
            raise HTTPError(422, one_line(exc, 500).replace(".upload-", "upload ")) from None
        return {"id": patch.digest, "name": name, "default": list(service.registry.default)}

    @app.delete("/v1/patches/{patch_id}", summary="Remove a patch from the registry (admin)", responses=schemas.ADMIN_ERRORS)
    async def delete(patch_id: str, request: Request) -> dict[str, Any]:
        require_admin(request)
        return {"deleted": service.delete(patch_id).digest}

    @app.put("/v1/default-patches", summary="Switch the default patch set in one step (admin)",
             openapi_extra=schemas.DEFAULT_PATCHES_BODY, responses=schemas.ADMIN_ERRORS)
    async def default_patches(request: Request) -> dict[str, Any]:
        require_admin(request)  # before the body is read: no token, no parsing
        body = await read_json(request, schemas.DefaultPatches)
        return service.set_default(body.patches)

    # the request routes, called straight from ObserveMiddleware: FastAPI's routing, dependency
    # solving and exception middleware cost more CPU than the rest of a small request (issue 25);
    # they stay declared above for the schema, and behave the same either way
    hot.update({("POST", "/v1/classify"): classify, ("POST", "/v1/classify/binary"): classify_binary,
                ("POST", "/v1/embed/image"): embed_image, ("POST", "/v1/embed/text"): embed_text})
    return app


HANDLED = (HTTPError, ForgetpackError, Overloaded, Closed)  # what create_app's answer_error maps


class ObserveMiddleware:
    """Metrics for every request, the body limit checked from ``Content-Length`` before reading, and
    the hot routes (``hot``: classify, embed) called directly, their errors answered by ``answer_error``.

    Plain ASGI rather than ``@app.middleware("http")``, which costs a task and a stream per request."""

    def __init__(self, app: Any, service: Service, hot: dict[tuple[str, str], Any], answer_error: Any):
        self.app, self.service, self.limit = app, service, service.limits.max_body_bytes
        self.hot, self.answer_error = hot, answer_error

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
                break
        route = self.hot.get((scope["method"], scope["path"])) if not scope.get("root_path") else None

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                too_big = length.isdigit()
                response = error(413 if too_big else 400, f"request body over {self.limit} bytes" if too_big else "malformed Content-Length")
                await response(scope, receive, observed_send)
            elif route is not None:
                request = Request(scope, receive)
                try:
                    response = await route(request)
                except HANDLED as exc:
                    response = self.answer_error(request, exc)
                await response(scope, receive, observed_send)
            else:
                await self.app(scope, receive, observed_send)
        finally:
            self.service.metrics.observe_request(scope["path"] if route is not None else route_of(scope), status,
                                                 time.perf_counter() - start)


def _decode_b64(images: list[str]) -> list[bytes]:
    out = []
    for i, text in enumerate(images):
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPError(422, f"images[{i}]: not valid base64") from None
    return out


def _validation_message(errors: list[Any]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)
