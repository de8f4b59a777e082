"""Releasing the starting thread's idle OpenMP team (``lorakit.serve.openmp``): the call takes on
this platform, and torch computes correctly afterwards, on that thread and on another."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from lorakit.serve.openmp import release_idle_team, runtime_paths

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


def test_runtime_paths_read_paths_with_spaces_and_put_torchs_runtime_first(tmp_path):
    torch_dir = tmp_path / "site packages" / "torch"
    (torch_dir / "lib").mkdir(parents=True)
    other = tmp_path / "site packages" / "scikit_learn.libs" / "libgomp-a34b3233.so.1.0.0"
    ours = torch_dir / "lib" / "libgomp.so.1"
    maps = [
        f"7f00-7f10 r-xp 00000000 08:01 123    {other}\n",
        f"7f20-7f30 r-xp 00000000 08:01 456    {ours}\n",
        f"7f40-7f50 r--p 00000000 08:01 789    {ours}\n",
        "7f60-7f70 rw-p 00000000 00:00 0 \n",  # anonymous: no path
        f"7f80-7f90 r-xp 00000000 08:01 321    {tmp_path / 'libc.so.6'}\n",
    ]
    assert runtime_paths(maps, str(torch_dir)) == [str(ours), str(other)]
