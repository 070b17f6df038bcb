"""``python -m deqlm.eval RUN_DIR|results/runs [split=test] [eval.mem_len=300 ...]``: runs' eval records."""

from deqlm.eval.cli import main
from deqlm.infra.allocator import tune_allocator

tune_allocator()
raise SystemExit(main())
