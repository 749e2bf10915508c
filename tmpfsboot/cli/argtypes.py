"""Argument types shared by the verbs: each raises ValueError, which argparse reports."""

from __future__ import annotations


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    """A number of seconds (or a rate) above 0."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value
