"""Stage 1-2, on the submitting host: recipe -> plan (never imports torch).

schema.py (the closed schema), recipe.py (load_recipe: file, overrides, local paths),
rules.py (what cannot go together, one function per rule), plan.py (resolve -> frozen Plan),
memory.py, render.py (DeepSpeed / FSDP / accelerate / launch configs), arch.py (model shapes),
smoke.py (--smoke), plan_view.py (printing). The data-format registry is launcher/data/formats.py.
"""
