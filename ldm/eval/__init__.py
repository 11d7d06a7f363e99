"""Evaluation: how faithfully a model follows its prompts."""
