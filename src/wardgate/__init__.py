"""Wardgate: an identity-aware access proxy."""

__version__ = "0.1.0"
