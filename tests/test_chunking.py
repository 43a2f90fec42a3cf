"""Structures are split into one chunk per worker, balanced by estimated cost."""

from __future__ import annotations

from ase.build import molecule

from atomforge.flows.scheduling.chunking import balanced_chunks, estimated_cost, n_chunks


def test_one_chunk_per_worker_unless_a_chunk_size_is_given():
    assert n_chunks(119, slots=2, chunk_size=None) == 2
    assert n_chunks(1, slots=8, chunk_size=None) == 1
    assert n_chunks(10, slots=2, chunk_size=3) == 4


def test_chunks_balance_cost_and_keep_input_order():
    costs = [100.0, 1.0, 1.0, 50.0, 49.0, 1.0, 1.0]
    chunks = balanced_chunks(list(range(len(costs))), costs, 2)
    loads = [sum(costs[i] for i in chunk) for chunk in chunks]
    assert max(loads) - min(loads) <= 1.0
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(costs)))
    assert all(chunk == sorted(chunk) for chunk in chunks)


def test_no_empty_chunks_when_there_are_more_workers_than_items():
    assert balanced_chunks(["a", "b"], [1.0, 1.0], 5) == [["a"], ["b"]]


def test_larger_molecules_cost_more():
    assert estimated_cost(molecule("C6H6")) > estimated_cost(molecule("H2O"))
