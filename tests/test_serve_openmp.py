"""Releasing the starting thread's idle OpenMP team (``lorakit.serve.openmp``): the call takes on
this platform, and torch computes correctly afterwards, on that thread and on another."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from lorakit.serve.openmp import release_idle_team

OPENMP = "OpenMP" in torch.__config__.parallel_info()


def product_is_right() -> bool:
    torch.manual_seed(0)
    a = torch.randn(512, 512)
    return torch.allclose(a @ a, (a.double() @ a.double()).float(), atol=1e-3)


@pytest.mark.skipif(not (OPENMP and sys.platform == "linux"), reason="torch without OpenMP")
def test_the_team_is_released_and_torch_still_computes():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert product_is_right()  # (a parallel region: this thread has a team)
        assert release_idle_team()
        assert product_is_right()  # a new team, made on demand
        results = []
        worker = threading.Thread(target=lambda: results.append(product_is_right()))
        worker.start()
        worker.join()
        assert results == [True]
        assert release_idle_team()  # again: nothing left to free is fine
    finally:
        torch.set_num_threads(threads)
