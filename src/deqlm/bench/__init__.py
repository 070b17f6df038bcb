"""Benchmarks: `python -m deqlm.bench {solver,memory,speed,allocator} ...` (each subcommand is
deqlm.bench.<name>.main)."""
