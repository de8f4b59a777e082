"""``--allow-base-mismatch`` without ``--adapter`` is refused by every command that takes it
(review 33: ``eval`` and ``generate`` accepted it silently, ``export`` refused it)."""

from __future__ import annotations

import pytest

from tests.cli_runs import run_cli


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "no-such-model", "--data", "no-such.jsonl", "--allow-base-mismatch"],
        ["generate", "hi", "--model", "no-such-model", "--raw", "--allow-base-mismatch"],
    ],
    ids=["eval", "generate"],
)
def test_allow_base_mismatch_without_an_adapter_is_refused_before_loading(capsys, argv) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    # one line, about the flag: refused before the (missing) model or data is looked at
    assert err.count("\n") == 1, err
    assert "--allow-base-mismatch goes with --adapter" in err and "Traceback" not in err
