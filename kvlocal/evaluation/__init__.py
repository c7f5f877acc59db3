"""Evaluation harness: what compaction keeps and what it costs, against the full cache and baselines."""
