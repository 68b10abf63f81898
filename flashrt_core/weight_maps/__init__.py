"""Checkpoint tensor names and shapes per model family (what a checkpoint must contain)."""
