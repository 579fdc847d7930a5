"""MQAR (multi-query associative recall) synthetic task."""

from .data import generate

__all__ = ["generate"]
