"""``forgetpack serve``: an HTTP service over the torch-free runtime where each request picks its patches.

    from runtime.serve import ServeConfig, create_app
    app = create_app(ServeConfig(source="export-dir", patches_dir="patches/"))   # an ASGI app (FastAPI)

One base model, many patches: a request names the patches it wants (registry ids: digests or
registered names, never paths); its patch set is resolved once to an immutable
``runtime.PatchState`` kept in a bounded LRU (``states.py``), so no request can see another's
patches or a half-made change. Images from concurrent requests are encoded in micro-batches
(``batching.py``); text features are cached per prompt by the backend and projected per state.
``ray_app.py`` runs the same app as a Ray Serve deployment. FastAPI, uvicorn and ray are imported
here only by the modules that need them, never by ``runtime`` itself. See docs/serve.md.
"""

from __future__ import annotations

from runtime.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(config: ServeConfig, **kwargs):  # noqa: ANN201 (FastAPI is imported lazily)
    """The FastAPI app for ``config`` (see ``runtime.serve.app.create_app``)."""
    from runtime.serve.app import create_app as build

    return build(config, **kwargs)
