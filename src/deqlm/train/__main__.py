"""`python -m deqlm.train EXPERIMENT.yaml [key=value ...]` | `... --resume RUN_DIR [key=value ...]`."""

from deqlm.infra.allocator import tune_allocator
from deqlm.train.cli import main

tune_allocator()
raise SystemExit(main())
