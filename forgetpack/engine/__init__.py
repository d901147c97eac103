"""The forgetting engine (torch, open_clip): class names in, a verified patch out.

Model specs (``models``), where each tower keeps its projection (``projections``), cached
pre-projection text features (``features``), vocabulary and preserve sets (``vocabulary``,
``preserve``), the request and what a patch records of it (``request``), forget targets
(``targets``), text-space verification (``measure``), solvers (``solvers``, registered by entry
point), and the solve/verify loop (``solve``).
"""
