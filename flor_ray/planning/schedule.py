"""Cutting a run's iterations into segments and placing tasks on slots: how many
segments its work is worth, balanced chunks, the plan's makespan."""

from __future__ import annotations

import heapq
from typing import Sequence

__all__ = ["worth_splitting", "split", "merge", "makespan"]


def worth_splitting(work: float, setup: float, k_max: int) -> int:
    """How many segments a run's work is worth: each segment pays the set-up again
    (a process start, imports, data loading), so a split must save more than that.
    With ``k`` segments on free workers the run takes ``setup + work / k``; each
    extra segment also costs ``setup`` of worker time that other runs could use, so
    we split only while a segment's share of the work stays above its set-up."""
    if setup <= 0:
        return max(1, k_max)
    return max(1, min(k_max, int(work // setup)))


def split(items: Sequence[int], k: int, cost) -> list[list[int]]:
    """Contiguous chunks of ``items`` with balanced cost (k chunks at most)."""
    if k <= 1:
        return [list(items)]
    total = sum(cost(i) for i in items) or len(items)
    target = total / k
    chunks, cur, acc = [], [], 0.0
    for i in items:
        c = cost(i) or total / len(items)
        if cur and acc + c / 2 > target and len(chunks) < k - 1:
            chunks.append(cur)
            cur, acc = [], 0.0
        cur.append(i)
        acc += c
    chunks.append(cur)
    return chunks


def merge(pieces: list[list[int]], k: int, cost) -> list[list[int]]:
    """Merge adjacent pieces until at most ``k`` remain, cheapest neighbours first."""
    pieces = [list(p) for p in pieces]
    while len(pieces) > k:
        j = min(range(len(pieces) - 1), key=lambda j: cost(pieces[j] + pieces[j + 1]))
        pieces[j : j + 2] = [pieces[j] + pieces[j + 1]]
    return pieces


def makespan(costs: Sequence[float], workers: int) -> float:
    """Longest-processing-time-first list scheduling on ``workers`` slots."""
    loads = [0.0] * max(1, workers)
    heapq.heapify(loads)
    for c in sorted(costs, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + c)
    return max(loads) if loads else 0.0
