"""Embed a collection once; classify and search it under any patch set in seconds.

    from runtime.index import build_index, rescore, search
    build_index("photos/", "photos.index", "vitb32-export/")            # or engine="ray"
    rescore("photos.index", ["cat", "dog"], patches=["forget-cat.fpatch.safetensors"], compare=True)
    search("photos.index", "a cat", k=10, patches=["forget-cat.fpatch.safetensors"])

Forgetting changes only the text projection, so stored image embeddings stay valid under every
patch. The store is LanceDB (store.py); lancedb, pyarrow and ray are imported only when used.
See docs/index.md.
"""

from __future__ import annotations

from runtime.index.build import BuildProgress, BuildReport, build_index
from runtime.index.rescore import RescoreReport, rescore
from runtime.index.search import Hit, SearchReport, search
from runtime.index.store import IndexStore
from runtime.index.verify import VerifyReport, verify_index

__all__ = ["BuildProgress", "BuildReport", "Hit", "IndexStore", "RescoreReport", "SearchReport", "VerifyReport",
           "build_index", "rescore", "search", "verify_index"]
