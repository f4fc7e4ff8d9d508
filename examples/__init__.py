"""Runnable examples of embedding corral (see README.md, "Examples")."""
