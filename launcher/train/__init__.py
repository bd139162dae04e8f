"""Stage 4, on every rank: `python -m launcher.train RUN_DIR` reads plan.json and trains.

entry.py (the per-rank entrypoint), model.py, data.py / data_files.py, callbacks.py (the
trainer class, metrics, NaN policy), checkpoint.py (atomic checkpoints, resume), preflight.py,
preemption.py.
"""
