"""Workflows over whole runs: sweeps (variants of one recipe compared side by side) and
multi-stage pipelines (each stage starting from the previous stage's result)."""
