"""Evaluations: datasets, scorers, scorecards, metrics, the runner that scores a dataset as a task, and the service."""
