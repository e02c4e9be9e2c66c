"""Shared attention executors: plans in, attention out. Never imports transformers."""
