"""Measuring forgetting on real images: datasets, metrics, the image-embedding cache, the harness, CLIP_benchmark results."""
