"""Benchmarks: `python -m deqlm.bench {solver,memory,speed} ...` (each subcommand is
deqlm.bench.<name>.main)."""
