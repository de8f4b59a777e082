"""``lorakit serve`` start-up: the port is taken before the model loads, the adapters are named."""

from __future__ import annotations

import logging
import socket

from lorakit import cli
from lorakit.commands import serve


def test_a_busy_port_is_reported_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import lorakit.models

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the busy port was found")

    monkeypatch.setattr(lorakit.models, "load_model", load_model)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["serve", "--adapters", str(tmp_path), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err == (
        f"lorakit: error: cannot listen on 127.0.0.1:{port} (Address already in use); stop the "
        "program using that port or pass another --port\n"
    )


def test_serve_checks_the_port_before_building(tmp_path, monkeypatch):
    import uvicorn

    events = []
    real_check_port = serve._check_port

    def check_port(host, port):
        events.append(("check", host, port))
        real_check_port(host, port)

    monkeypatch.setattr(serve, "_check_port", check_port)
    monkeypatch.setattr(serve, "build", lambda args: events.append("build") or "the app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: events.append(("run", app)))
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cli.main(["serve", "--adapters", str(tmp_path), "--port", str(port)]) == 0
    assert events == [("check", "127.0.0.1", port), "build", ("run", "the app")]


def test_serve_logs_the_adapters_it_found(tmp_path, caplog, model_dir):
    import lorakit
    from lorakit.io import save_adapter
    from tests import tiny_models

    for name in ("support", "billing"):
        model = tiny_models.llama()
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
        save_adapter(model, tmp_path / "adapters" / name)
    args = cli.build_parser().parse_args(
        ["serve", "--model", str(model_dir), "--adapters", str(tmp_path / "adapters")]
    )
    with caplog.at_level(logging.INFO, logger="lorakit.serve"):
        serve.build(args)
    found = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve"]
    root = (tmp_path / "adapters").resolve()
    assert found == [f"adapters in {root}: 2 served (billing, support), 0 skipped"]


def test_start_up_objects_are_frozen_out_of_the_collector_before_serving(tmp_path, monkeypatch):
    """A full collection walks every tracked object with the GIL held: the model's ~450,000
    (SmolLM2-135M with an adapter) cost 0.3 s a collection before ``gc.freeze``."""
    import gc

    import uvicorn

    frozen = []
    monkeypatch.setattr(serve, "build", lambda args: object())
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: frozen.append(gc.get_freeze_count()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gc.unfreeze()
    try:
        assert cli.main(["serve", "--adapters", str(tmp_path), "--port", str(port)]) == 0
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 0
