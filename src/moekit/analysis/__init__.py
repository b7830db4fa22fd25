"""Routing analysis: load statistics, collapse detection, specialization, plots and reports."""
