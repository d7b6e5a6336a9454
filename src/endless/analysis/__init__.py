"""Analyses of where attention goes (docs/methods.md section 2, Figure 2: attention sinks)."""
