"""Tiergate: shared core (policy model, router artifacts, CLI, local control plane)."""
