"""`python -m deqlm.train EXPERIMENT.yaml [key=value ...]` | `... --resume RUN_DIR [key=value ...]`."""

from deqlm.train.cli import main

raise SystemExit(main())
