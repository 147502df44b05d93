"""Evaluation on a synthetic concept world where the answer is known (`ctrak eval`)."""
