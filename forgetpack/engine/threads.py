"""How many threads numpy's BLAS may use while solving: one.

The solve is a series of small products and factorisations ([thousands, 512] x [512, 512]).
On the project's 2-core machines OpenBLAS's own threads made a warm ViT-B-32 solve 4-7x
slower than one thread (5.9-9.7 s against 1.3-1.5 s, measured in one process while other
work shared the cores): its threads spin and wait on each other, and the products are too
small to repay them. ``threadpoolctl`` (installed with the torch extra, via scikit-learn)
sets the limit for the duration; without it nothing changes. Only BLAS is limited: torch's
own thread pool, which the feature encoder tunes by measurement, is left alone. Cold and
warm runs solve under the same limit, so their patches stay bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SOLVE_BLAS_THREADS = 1


@contextlib.contextmanager
def solve_threads(limit: int = SOLVE_BLAS_THREADS) -> Iterator[None]:
    """Limit numpy's BLAS to ``limit`` threads inside the block (if ``threadpoolctl`` is installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - the torch extra brings it
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield
