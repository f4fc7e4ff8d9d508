"""Helpers for embedding code, built on messages only (never on manager modules)."""

__all__: list[str] = []
