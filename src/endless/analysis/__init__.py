"""Analyses of where attention goes (PAPERS.md section 2, Figure 2: attention sinks)."""
