"""Requests, sampling, generation and the engine loop."""
