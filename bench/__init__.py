"""StacyVM benchmark harness: the milestones users feel, beside the raw runtime.

Run from the repository root: `python -m bench --help`. See docs/benchmarks.md.
"""
