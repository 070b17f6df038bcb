"""``python -m deqlm.eval RUN_DIR|results/runs [split=test] [eval.mem_len=300 ...]``: write eval.json."""

from deqlm.allocator import tune_allocator
from deqlm.eval.cli import main

tune_allocator()
raise SystemExit(main())
