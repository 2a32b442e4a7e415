"""Evaluation: retrieval and classification metrics, with CLIP_benchmark's metric names."""
