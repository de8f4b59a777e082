"""Where ``lorakit train`` trains (``--device``, ``training_device``) and which process-group
backend a model's device gets under torchrun. This machine has no GPU: the CUDA cases stand in
torch's answers (how many GPUs it sees) and record what would be set."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import UserError
from lorakit.train import distributed
from lorakit.train.distributed import setup_distributed, training_device
from tests.cli_runs import train_cli


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two GPUs; ``torch.cuda.set_device`` calls are recorded, not made."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_auto_is_the_cpu_where_torch_sees_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == torch.device("cpu")
    assert training_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_a_gpu_torch_does_not_see_is_refused_saying_what_to_do(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"torch sees no GPU.*--device cpu"):
        training_device(requested)


@pytest.mark.parametrize("requested", ["tpu", "gpu", "cuda:x", ""])
def test_an_unknown_device_is_refused_naming_the_choices(requested):
    with pytest.raises(UserError, match=r"give auto, cpu, cuda or cuda:N"):
        training_device(requested)


def test_auto_and_cuda_take_the_gpu_of_the_local_rank_and_make_it_current(monkeypatch, two_gpus):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training_device("auto") == torch.device("cuda", 1)
    assert training_device("cuda") == torch.device("cuda", 1)
    assert training_device("cuda:0") == torch.device("cuda", 0)
    assert two_gpus == [1, 1, 0]


def test_a_gpu_index_beyond_those_torch_sees_is_refused(monkeypatch, two_gpus):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match=r"--device auto: torch sees 2 GPUs \(process LOCAL_RANK 2"):
        training_device("auto")
    with pytest.raises(UserError, match=r"--device cuda:5: torch sees 2 GPUs"):
        training_device("cuda:5")
    assert two_gpus == []


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_the_process_group_backend_follows_the_models_device(monkeypatch, device, backend):
    """A model on the CPU gets gloo even where torch sees a GPU (NCCL reduces GPU tensors
    only: DDP of a CPU model over NCCL fails); a CUDA model gets NCCL."""
    joined = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend: joined.append(backend)
    )
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    setup_distributed("ddp", torch.device(device))
    assert joined == [backend]


def test_lorakit_train_refuses_a_missing_gpu_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    output = tmp_path / "run"
    assert train_cli("no-such-model-dir", data, output, "--device", "cuda") == 2
    assert "--device cuda: torch sees no GPU" in capsys.readouterr().err
    assert not output.exists()


def test_a_gpu_index_under_torchrun_is_refused_saying_what_to_give(monkeypatch, two_gpus):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(
        UserError, match=r"--device cuda:0: under torchrun every process.*--device cuda"
    ):
        training_device("cuda:0")
    assert training_device("cuda") == torch.device("cuda", 1)
    assert two_gpus == [1]
