"""The forgetting engine (torch, open_clip): class names in, a verified patch out.

Model specs (``models``), where each tower keeps its projection (``projections``), cached
pre-projection text features (``features``), vocabulary and preserve sets (``vocabulary``,
``preserve``), solvers (``solvers``), and the solve/verify loop (``solve``).
"""
