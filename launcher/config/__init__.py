"""Stage 1-2, on the submitting host: recipe -> plan (never imports torch).

recipe.py (the closed schema), rules.py (what cannot go together), plan.py (resolve ->
frozen Plan), memory.py, render.py (DeepSpeed / accelerate / launch configs), arch.py (model
shapes), formats.py (the data-format registry), smoke.py (--smoke), plan_view.py (printing).
"""
