"""Segment-masked causal attention (memory stream, prompt stream, prompt + selected chunks)."""
