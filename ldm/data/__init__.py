"""Datasets of captioned images, and the synthetic shapes dataset."""
