"""The example project's pipeline: one doit module per stage (not installed; dodo.py imports them)."""
