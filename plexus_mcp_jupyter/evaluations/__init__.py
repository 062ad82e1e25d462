"""Evaluations: datasets, scorers, scorecards, metrics and the runner that scores a dataset as a task."""
