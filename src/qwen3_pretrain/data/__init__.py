"""Megatron indexed datasets, preprocessing, and the GPT sample index that training reads."""
