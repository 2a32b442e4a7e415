"""Benchmarks: ratios measured side by side in one run (``graytune bench``, ``make bench``)."""
