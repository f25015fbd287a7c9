"""Seeded training scenarios for ``benchmarks/detection.py``: healthy runs and faults of every kind."""
