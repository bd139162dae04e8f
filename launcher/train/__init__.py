"""Stage 4, on every rank: `python -m launcher.train RUN_DIR` reads plan.json and trains.

entry.py (the per-rank entrypoint, top to bottom), args.py (the trainer's arguments from the
plan), data.py (tokenizer, the shared Arrow splits), model.py (base model, 4-bit, PEFT
config), trainers.py (the format's trainer), callbacks.py (the trainer subclass, metrics, the
NaN policy), checkpoint.py (atomic checkpoints, resume cleanup, final/), preflight.py (the
process group), preemption.py (save on the requeue signal), faults.py (test-only fault
injection).
"""
