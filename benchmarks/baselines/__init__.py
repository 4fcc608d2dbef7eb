"""Baselines the fan-out benchmark compares oddsfeed with."""
