"""Stateful fakes of the provider APIs (tests/fakes/base.py says how they work)."""
