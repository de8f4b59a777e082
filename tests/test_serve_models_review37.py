"""Review 37 (serving models): models whose requests cannot share a running batch are served one
at a time by the engine itself, each request's tokens equal to peft's ``generate`` alone.

1. GLM-MoE-DSA and DeepSeek-V3.2 (``DynamicIndexedLayer`` caches): every request that arrived
   while another ran once failed ("cannot join ... --max-batch 1"); now the engine runs one at a
   time (the others wait) and says so once in its log when it is built.
2. MiniMax, RecurrentGemma and RWKV once failed every request with an AttributeError (no
   ``.cache`` in their output, or a cache of their own); now their state is carried between
   forwards (``one_at_a_time.SoloDecoder``), with the adapter applied. xLSTM (whose own
   ``generate`` fails here) is refused when the engine, or ``lorakit serve``, is built.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging

import peft
import pytest
import torch
import transformers as T

from lorakit.errors import UserError
from lorakit.io.read import read_adapter
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from tests import serving, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.15,
)
INDEXED = dict(
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=2,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=4,
    initializer_range=0.15,
)
MLA = ["q_b_proj", "kv_b_proj", "o_proj"]


def _rwkv(vocab: int = 128):
    config = T.RwkvConfig(
        hidden_size=32,
        num_hidden_layers=2,
        vocab_size=vocab,
        attention_hidden_size=32,
        intermediate_size=64,
    )
    return T.RwkvForCausalLM(config)


MODELS = {  # name: (tiny model, LoRA targets)
    "glm_moe_dsa": (
        lambda: T.GlmMoeDsaForCausalLM(T.GlmMoeDsaConfig(**INDEXED, vocab_size=128)),
        MLA,
    ),
    "deepseek_v32": (
        lambda: T.DeepseekV32ForCausalLM(T.DeepseekV32Config(**INDEXED, vocab_size=128)),
        MLA,
    ),
    "minimax": (
        lambda: T.MiniMaxForCausalLM(
            T.MiniMaxConfig(
                **SIZES,
                vocab_size=128,
                head_dim=8,
                num_local_experts=2,
                num_experts_per_tok=1,
                layer_types=["linear_attention", "full_attention", "linear_attention"],
                block_size=4,
            )
        ),
        ["qkv_proj", "out_proj", "q_proj", "v_proj"],
    ),
    "recurrent_gemma": (
        lambda: T.RecurrentGemmaForCausalLM(
            T.RecurrentGemmaConfig(
                **SIZES,
                vocab_size=128,
                lru_width=32,
                attention_window_size=8,
                block_types=["recurrent", "attention", "recurrent"],
            )
        ),
        ["linear_x", "linear_y", "q_proj", "v_proj"],
    ),
    "rwkv": (_rwkv, ["key", "value", "receptance"]),
}
# (prompt length, adapter, new tokens): 7 requests queued at once, max_batch 3 asked for
JOBS = [(5, "a0", 6), (9, None, 3), (2, "a1", 8), (12, "a0", 5), (1, None, 7), (7, "a1", 2)]


def _peft_oracle(base, targets, directory):
    """peft's model with adapters a0 (r 4) and a1 (r 2) of random factors, saved to
    ``directory``."""
    oracle = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), "a0"
    )
    oracle.add_adapter("a1", peft.LoraConfig(r=2, lora_alpha=8, target_modules=targets))
    serving.randomize_peft_lora(oracle)
    oracle.eval().save_pretrained(directory)
    return oracle


def _served(name: str, tmp_path):
    make, targets = MODELS[name]
    torch.manual_seed(0)
    base = make().eval()
    base.generation_config.eos_token_id = None
    served = copy.deepcopy(base)
    oracle = _peft_oracle(base, targets, tmp_path)
    prepare_for_serving(served, targets)
    bank = AdapterBank(served, max_rank=4, capacity=2)
    for adapter in ("a0", "a1"):
        file = read_adapter(tmp_path / adapter)
        bank.load(adapter, file.config, file.tensors)
    return oracle, served, bank


@pytest.mark.parametrize("name", list(MODELS))
def test_requests_submitted_together_equal_peft_generate_alone(name, tmp_path, caplog):
    oracle, served, bank = _served(name, tmp_path)
    with caplog.at_level(logging.INFO, logger="lorakit.serve.engine"):
        engine = Engine(served, bank, max_batch=3, eos_token_ids=[])
    said = [r.getMessage() for r in caplog.records if "one request at a time" in r.getMessage()]
    assert len(said) == 1 and type(served).__name__ in said[0], said
    assert engine.max_batch == 1
    generator = torch.Generator().manual_seed(7)
    jobs = [
        (torch.randint(1, 128, (length,), generator=generator).tolist(), adapter, new)
        for length, adapter, new in JOBS
    ]
    events = serving.engine_events(engine, jobs)
    for (prompt, adapter, new), row_events in zip(jobs, events, strict=True):
        assert row_events[-1].finish_reason == "length", row_events[-1].error
        ids = [token for event in row_events for token in event.token_ids]
        assert ids == serving.peft_greedy(oracle, prompt, adapter, new), (prompt, adapter)
    assert engine.stats.max_running == 1 and engine.stats.joined_running == 0


def test_a_batchable_model_keeps_its_batch_and_says_nothing(caplog):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**SIZES, vocab_size=128))
    with caplog.at_level(logging.INFO, logger="lorakit.serve.engine"):
        engine = Engine(model, None, max_batch=3)
    assert engine.max_batch == 3
    assert not [r for r in caplog.records if "one request at a time" in r.getMessage()]


def _xlstm():
    config = T.xLSTMConfig(
        hidden_size=32,
        embedding_dim=32,
        num_hidden_layers=2,
        num_blocks=2,
        vocab_size=128,
        num_heads=2,
        mode="inference",
    )
    return T.xLSTMForCausalLM(config)


def test_xlstm_is_refused_when_the_engine_is_built():
    with pytest.raises(ValueError, match=r"'xlstm' model: .*lorakit merge") as refused:
        Engine(_xlstm(), None)
    assert isinstance(refused.value, UserError)  # (the CLI prints it as one line)


def test_lorakit_serve_refuses_xlstm_in_one_line(tmp_path, capsys, monkeypatch):
    import uvicorn

    from lorakit.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)  # (never served)

    _xlstm().save_pretrained(tmp_path / "model")
    tiny_tokenizer.build(vocab_size=128).save_pretrained(tmp_path / "model")
    (tmp_path / "adapters").mkdir()
    capsys.readouterr()  # (the progress bars of the saves above)
    argv = ["serve", "--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "adapters")]
    assert main([*argv, "--port", str(serving.free_port())]) == 2
    err = capsys.readouterr().err
    assert "lorakit: error: lorakit cannot serve a 'xlstm' model" in err and "merge" in err
    assert err.strip().count("\n") == 0  # one line, no traceback


def test_lorakit_serve_answers_concurrent_rwkv_requests_like_peft(tmp_path, monkeypatch):
    """The real command (model and adapter read from disk, uvicorn, httpx): 4 requests at once
    on an RWKV base with a LoRA adapter and without one, each equal to peft's greedy text."""
    import httpx
    import uvicorn

    from lorakit.cli import main
    from lorakit.commands import serve as serve_command

    tokenizer = tiny_tokenizer.build(vocab_size=128)
    torch.manual_seed(0)
    base = _rwkv(len(tokenizer)).eval()
    base.generation_config.eos_token_id = None
    base.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    oracle = _peft_oracle(base, ["key", "value", "receptance"], tmp_path / "adapters")
    started: dict = {}

    def run_server(app, **kwargs) -> None:
        kwargs["log_level"] = "warning"
        started["server"] = uvicorn.Server(uvicorn.Config(app, **kwargs))
        started["server"].run()

    monkeypatch.setattr(serve_command, "_freeze_start_up_objects", lambda: None)
    monkeypatch.setattr(uvicorn, "run", run_server)
    port = serving.free_port()
    argv = ["serve", "--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "adapters")]
    results: dict = {}
    thread = serving.run_in_thread(lambda: main([*argv, "--port", str(port)]), "serve", results)
    serving.wait_until(lambda: "server" in started and started["server"].started)
    prompts = [[5, 9, 17, 3], [40, 2], [7, 7, 8, 30, 11, 4], [99]]
    adapters = ["a0", None, "a1", "a0"]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            def ask(prompt, adapter):
                body = {"prompt": prompt, "max_tokens": 5, "temperature": 0}
                body["model"] = adapter or client.get("/v1/models").json()["data"][0]["id"]
                return client.post("/v1/completions", json=body)

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(ask, prompts, adapters))
    finally:
        started["server"].should_exit = True
        thread.join(timeout=30)
    assert results["serve"] == 0
    texts = []
    for prompt, adapter, answer in zip(prompts, adapters, answers, strict=True):
        assert answer.status_code == 200, answer.text
        texts.append(tokenizer.decode(serving.peft_greedy(oracle, prompt, adapter, 5)))
        assert answer.json()["choices"][0]["text"] == texts[-1], (prompt, adapter)
    assert all(texts) and len(set(texts)) > 1
