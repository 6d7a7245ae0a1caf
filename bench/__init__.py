"""`python -m bench`: the EMA update timed side by side (see BENCHMARKS.md)."""
