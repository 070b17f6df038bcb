"""``python -m deqlm.eval RUN_DIR|results/runs [split=test] [eval.mem_len=300 ...]``: write eval.json."""

from deqlm.eval.perplexity import main

raise SystemExit(main())
