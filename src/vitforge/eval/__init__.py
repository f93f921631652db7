"""Evaluation: metrics, attention verification, TTA, ensembles, reports."""
