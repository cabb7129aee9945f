"""Evaluation: every compared model scored on the eval split, metrics with CIs, comparisons, reports."""
