"""Evaluations: datasets, scorers, scorecards and metrics, usable without any server."""
