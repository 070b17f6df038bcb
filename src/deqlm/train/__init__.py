"""Training: `python -m deqlm.train EXPERIMENT.yaml [key=value ...]` or `--resume RUN_DIR`.

`cli.py` parses the command line without torch, `run.py` trains (the one module the command line imports once
it is understood), `trainer.py` holds `Trainer` and `train`. Import names from those modules: this package
re-exports nothing, so importing it loads nothing.
"""
