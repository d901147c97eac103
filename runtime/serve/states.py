"""Per-request patch states: each ordered patch set resolved once to an immutable ``PatchState``.

A state is built with ``Model.patch_state`` (the format library's ``apply_in_order``, exactly as
``Model.set_patches`` builds the model's own) and never changes afterwards, so a request that
holds one sees one patch set from start to end. States are kept in a bounded LRU keyed by the
ordered patch digests: a hit costs a dict lookup, a miss a few small matrix products.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from forgetpack.format.patch import Patch
from runtime import Model, PatchState


class PatchStates:
    """A bounded, thread-safe LRU of ``PatchState`` by ordered patch digests."""

    def __init__(self, model: Model, capacity: int, on_lookup: Callable[[bool], None] | None = None):
        self.model = model
        self.capacity = capacity
        self._states: OrderedDict[tuple[str, ...], PatchState] = OrderedDict()
        self._lock = threading.Lock()
        self._on_lookup = on_lookup or (lambda hit: None)

    def __len__(self) -> int:
        return len(self._states)

    def get(self, digests: Sequence[str], patches: Callable[[], Sequence[Patch]]) -> PatchState:
        """The state for the patches with ``digests``, in this order; ``patches()`` loads them on a miss
        (a bad set raises and is not kept). Keyed by digests the registry already knows: computing a
        patch's digest hashes all of it, too slow for every request."""
        key = tuple(digests)
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
        self._on_lookup(state is not None)
        if state is not None:
            return state
        state = self.model.patch_state(list(patches()))  # outside the lock: a miss never stalls the hits
        with self._lock:
            state = self._states.setdefault(key, state)
            self._states.move_to_end(key)
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)
        return state

    def drop(self, digest: str) -> None:
        """Forget every state that uses the patch ``digest`` (after it is deleted from the registry)."""
        with self._lock:
            for key in [k for k in self._states if digest in k]:
                del self._states[key]
