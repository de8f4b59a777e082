"""``lorakit.analysis.plots.save_figure``: atomic (unique temporary, fsync, rename), safe when two
runs write into one folder, and nothing left open or behind when writing fails."""

from __future__ import annotations

import os

import pytest

from lorakit.analysis.plots import _pyplot, save_figure

PNG = b"\x89PNG\r\n\x1a\n"


def _figure(points: int = 50):
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(3, 2))
    axes.plot(range(points))
    return figure


def test_two_runs_saving_one_plot_at_once_both_succeed(tmp_path):
    """The second run saves while the first is still writing its temporary file (as two
    `lorakit analyze --plots DIR` processes can): with one fixed temporary name the second
    renamed the first's half-written file away and the first failed."""
    plt = _pyplot()
    path = tmp_path / "spectra.png"
    first, second = _figure(), _figure(400)
    original = first.savefig
    sizes = {}

    def interleaved(target, **kwargs):
        original(target, **kwargs)
        sizes["first"] = os.path.getsize(target)
        save_figure(second, path)  # the other run, in the middle of this one's save
        sizes["second"] = path.stat().st_size

    first.savefig = interleaved
    assert save_figure(first, path) == path
    assert path.read_bytes().startswith(PNG)
    assert path.stat().st_size == sizes["first"] != sizes["second"]  # the last rename wins
    assert sorted(os.listdir(tmp_path)) == ["spectra.png"]
    assert not plt.fignum_exists(first.number) and not plt.fignum_exists(second.number)


def test_a_failed_save_leaves_no_temporary_and_closes_the_figure(tmp_path):
    plt = _pyplot()
    path = tmp_path / "ranks.png"
    path.write_bytes(b"old plot")
    figure = _figure()

    def broken(target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(PNG[:4])  # half written
        raise OSError("disk full")

    figure.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        save_figure(figure, path)
    assert path.read_bytes() == b"old plot"  # the old file, untouched
    assert sorted(os.listdir(tmp_path)) == ["ranks.png"]
    assert not plt.fignum_exists(figure.number)


def test_the_png_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "spectra.png"
    save_figure(_figure(), path)
    assert path.read_bytes().startswith(PNG)
    written = [name for name in synced if os.path.basename(name).startswith(".spectra.png.")]
    assert written, synced  # the temporary file, before its rename
    assert str(tmp_path) in synced  # and the folder after it
