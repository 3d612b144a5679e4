"""Intra-op thread count for torch, set once per entry point (torch's default can oversubscribe shared hosts)."""

from __future__ import annotations

import os

import torch


def set_threads(threads: int | None = None) -> int:
    """Sets torch's intra-op threads to ``threads`` (default: every core) and returns the count used."""
    n = threads if threads is not None else os.cpu_count() or 1
    if n < 1:
        raise ValueError(f"set_threads: threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
