"""EVA review 34, against PEFT 0.21.2 where it applies (the oracle: its own ``SVDHook``, loop and
``IncrementalPCA``, that PCA made untruncated -- every component kept from the first batch on,
in float64 -- so that it is exact and both compute the same components):

1. before a first rank distribution exists, an input needs all its components (PEFT's
   ``rank_dist = max_components``): one whose components converged stops at once (lorakit froze
   nothing until every input had components);
2. batches of ``inputs_embeds`` count the tokens their ``attention_mask`` / ``labels`` allow
   (they were only applied with ``input_ids``);
3. a layer called several times per forward (ALBERT's shared layer) takes one step per call, as
   PEFT's hook does (each call's rows overwrote the last's when few, and calls shared one
   convergence step);
4. the statistics keep the leading components only (a k x k matrix per input was kept, twice);
5. an adapter name the model lacks is named, with the model's adapters."""

from __future__ import annotations

import contextlib
import io
import warnings

import peft
import pytest
import torch
from transformers import AlbertConfig, AlbertModel

import lorakit
import lorakit.eva
from lorakit.errors import UnknownAdapterError
from lorakit.eva_statistics import _InputMoments, explained_variance
from tests import tiny_models
from tests.eva_oracle import lorakit_statistics, peft_svd_hooks, token_counts


@pytest.fixture
def exact_peft(monkeypatch):
    """PEFT's EVA with an exact incremental PCA; {layer: tokens its statistics hold}."""
    return peft_svd_hooks(monkeypatch, every_component=True)


@pytest.fixture
def our_stats(monkeypatch):
    """{layer input (its leader): (components, eigenvalues, tokens)} as lorakit's EVA ends."""
    return lorakit_statistics(monkeypatch)


def _batches(count, size=8, length=20, seed=4, prompt=4, pad=3, labels=True) -> list[dict]:
    """Batches of random ids: ``pad`` padded positions at the end of row 0, the first
    ``prompt`` positions of every row labelled -100."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (size, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length - pad :] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = ids.clone()
            batch["labels"][:, :prompt] = -100
        batches.append(batch)
    return batches


def _albert() -> AlbertModel:
    """A tiny ALBERT: one shared layer run 3 times per forward (hidden 64, ffn 96)."""
    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=128,
        embedding_size=32,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
    )
    return AlbertModel(config).eval()


def _ours(make, fields, batches, **eva):
    config = lorakit.LoraConfig(
        **fields, init_lora_weights="eva", eva_config=lorakit.EvaConfig(**eva)
    )
    model = lorakit.get_peft_model(make(), config)
    lorakit.initialize_lora_eva_weights(model, batches)
    return model


def _theirs(make, fields, batches, **eva):
    """PEFT's EVA, refused if it cycles the loader (lorakit reads it once: the two are only
    comparable when PEFT stops within one pass)."""
    config = peft.LoraConfig(**fields, init_lora_weights="eva", eva_config=peft.EvaConfig(**eva))
    model = peft.get_peft_model(make(), config)
    forwards = []

    def forward(model, batch):
        forwards.append(1)  # the first batch is run once more, to find the shared inputs
        assert len(forwards) <= len(batches) + 1, "PEFT cycled the loader"
        return model(**batch)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        peft.initialize_lora_eva_weights(
            model, batches, forward_fn=forward, show_progress_bar=False
        )
    return model


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {
        key.removeprefix("base_model.").removeprefix("model.").replace(".default", ""): value
        for key, value in model.state_dict().items()
        if "lora_A" in key
    }


def _assert_equal_to_peft(ours, theirs, atol=1e-5):
    """Same ranks and alphas, and A equal row by row, signs included."""
    ours_config, theirs_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert ours_config.rank_pattern == theirs_config.rank_pattern
    assert ours_config.alpha_pattern == theirs_config.alpha_pattern
    ours_a, theirs_a = _lora_a(ours), _lora_a(theirs)
    assert ours_a.keys() == theirs_a.keys()
    for key, value in theirs_a.items():
        torch.testing.assert_close(ours_a[key], value, rtol=0, atol=atol, msg=key)


# ---------------------------------------------------------- 1: freezing before a distribution
def test_an_input_converged_before_the_others_have_components_stops_as_peft_stops_it(
    exact_peft, our_stats
):
    """30 batches of 12 tokens, then 30 of 160: q_proj (r=2, rho=2: 4 components) counts the
    short batches, down_proj (r=8: 16) skips them, so no rank distribution exists for 30
    batches. PEFT checks each input's 4 / 16 components before every batch meanwhile: layer
    1's q_proj converges after 9 batches (108 tokens) and stops. lorakit froze nothing until
    every input had components and read 1640 tokens for it (A off by up to 0.49)."""
    short = _batches(30, size=1, length=12, seed=1, prompt=0, pad=0)
    long = _batches(30, size=8, length=20, seed=2, prompt=0, pad=0)
    fields = dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 8}
    )
    eva = dict(rho=2.0, tau=0.9)
    ours = _ours(tiny_models.llama, fields, short + long, **eva)
    theirs = _theirs(tiny_models.llama, fields, short + long, **eva)
    _assert_equal_to_peft(ours, theirs)
    tokens = token_counts(our_stats)
    assert tokens == exact_peft
    assert tokens["model.layers.1.self_attn.q_proj"] == 108  # 9 short batches, then frozen
    assert tokens["model.layers.0.mlp.down_proj"] < 30 * 160  # frozen too, after a distribution


# ------------------------------------------------------------------- 2: inputs_embeds batches
def test_inputs_embeds_batches_count_the_tokens_their_masks_allow(our_stats):
    """3 batches of 4 x 10 positions, 3 padded and 16 prompt ones each: 21 count per batch,
    whether the batch gives input_ids or inputs_embeds (was: 40, every position, with
    inputs_embeds); the same statistics, so the same A."""
    batches = _batches(3, size=4, length=10, prompt=4, pad=3)
    embed = tiny_models.llama().model.embed_tokens
    embedded = [
        {key: value for key, value in batch.items() if key != "input_ids"}
        | {"inputs_embeds": embed(batch["input_ids"]).detach()}
        for batch in batches
    ]
    fields = dict(r=2, lora_alpha=4, target_modules=["q_proj"])
    from_ids = _ours(tiny_models.llama, fields, batches, tau=1.0)
    ids_tokens = token_counts(our_stats)
    our_stats.clear()
    from_embeds = _ours(tiny_models.llama, fields, embedded, tau=1.0)
    assert ids_tokens == token_counts(our_stats) == dict.fromkeys(ids_tokens, 3 * 21)
    ids_a, embeds_a = _lora_a(from_ids), _lora_a(from_embeds)
    assert ids_a.keys() == embeds_a.keys()
    for key, value in ids_a.items():
        torch.testing.assert_close(embeds_a[key], value, rtol=0, atol=1e-6, msg=key)


def test_an_inputs_embeds_batch_whose_mask_does_not_fit_is_refused():
    """An attention_mask of another shape than the layers' (batch, T) cannot say which tokens
    count: refused, naming the mask (was: ignored without input_ids, every position counted)."""
    batch = _batches(1, size=2, length=10, labels=False)[0]
    embeds = tiny_models.llama().model.embed_tokens(batch["input_ids"]).detach()
    bad = {"inputs_embeds": embeds, "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    fields = dict(r=2, lora_alpha=4, target_modules=["q_proj"])

    def forward(model, batch):  # the model itself would refuse the mask first
        model(inputs_embeds=batch["inputs_embeds"])

    model = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(**fields, init_lora_weights="eva")
    )
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 12\)"):
        lorakit.initialize_lora_eva_weights(model, [bad], forward_fn=forward)


# ------------------------------------------------------------- 3: layers called several times
_ALBERT_ALL = ["query", "key", "value", "dense", "ffn", "ffn_output"]


def test_a_layer_called_several_times_a_forward_steps_per_call_as_peft(exact_peft, our_stats):
    """ALBERT's shared layer runs 3 times a forward: PEFT takes 3 partial fits and 3
    convergence steps a batch, so dense / ffn / ffn_output converge within the first batch
    (471 tokens = 3 x 157). lorakit took one step a batch: 942 / 1884 / 2355 tokens, other
    ranks."""
    batches = _batches(30, labels=False)
    fields = dict(r=4, lora_alpha=8, target_modules=_ALBERT_ALL)
    ours = _ours(_albert, fields, batches, tau=0.9)
    theirs = _theirs(_albert, fields, batches, tau=0.9)
    _assert_equal_to_peft(ours, theirs)
    assert token_counts(our_stats) == exact_peft
    prefix = "encoder.albert_layer_groups.0.albert_layers.0."
    assert exact_peft[prefix + "ffn_output"] == 3 * 157


def test_short_calls_of_a_layer_called_several_times_step_as_peft(exact_peft, our_stats):
    """5 batches of 10 tokens (fewer than ffn_output's 32 components: skipped for it), then
    30 of 80: query (4 components) counts each call of the short batches, and converges after
    3 of them (90 tokens), as in PEFT; was: only the last call's rows were counted."""
    strip = [{"input_ids": b["input_ids"]} for b in _batches(5, size=1, length=10, pad=0)]
    long = [{"input_ids": b["input_ids"]} for b in _batches(30, size=2, length=40, seed=5)]
    fields = dict(
        r=2, lora_alpha=4, target_modules=["query", "ffn_output"], rank_pattern={"ffn_output": 16}
    )
    ours = _ours(_albert, fields, strip + long, rho=2.0, tau=0.9)
    theirs = _theirs(_albert, fields, strip + long, rho=2.0, tau=0.9)
    _assert_equal_to_peft(ours, theirs)
    assert token_counts(our_stats) == exact_peft
    assert exact_peft["encoder.albert_layer_groups.0.albert_layers.0.attention.query"] == 90


def _leading_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading principal directions of ``rows`` (n, k), float64, each with its
    largest-magnitude entry positive (PEFT's signs): the test's own PCA."""
    values, vectors = torch.linalg.eigh(torch.cov(rows.double().T))
    leading = vectors[:, values.argsort(descending=True)[:count]].T
    largest = leading.abs().argmax(dim=1, keepdim=True)
    return leading * leading.gather(1, largest).sign()


def test_every_call_of_a_layer_counts_its_rows(our_stats):
    """5 batches of 10 tokens, 3 calls each, fewer than the 32 components the adapter's widest
    layer wants (ffn_output r=16, rho=2): every call's rows count for query (150 tokens; was
    50, each call overwrote the rows held before), and its A is the leading directions of all
    of them (tau=1: nothing converges, every batch is read)."""
    batches = [{"input_ids": b["input_ids"]} for b in _batches(5, size=1, length=10, pad=0)]
    fields = dict(
        r=2, lora_alpha=4, target_modules=["query", "ffn_output"], rank_pattern={"ffn_output": 16}
    )
    rows = []
    reference = _albert()
    query = reference.encoder.albert_layer_groups[0].albert_layers[0].attention.query
    query.register_forward_pre_hook(lambda module, args: rows.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for batch in batches:
            reference(**batch)
    model = _ours(_albert, fields, batches, rho=2.0, tau=1.0)
    name = "encoder.albert_layer_groups.0.albert_layers.0."
    assert token_counts(our_stats) == {name + "attention.query": 150, name + "ffn_output": 150}
    a = _lora_a(model)[name + "attention.query.lora_A.weight"]
    expected = _leading_rows(torch.cat(rows), a.shape[0]).float()
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------- 4: the components kept
def test_the_statistics_keep_only_the_leading_components(our_stats):
    """Each input keeps the leading max round(r * rho) components (c x k), not all k x k, and
    they are the full eigendecomposition's leading rows."""
    fields = dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 3}
    )
    _ours(tiny_models.llama, fields, _batches(4), rho=2.0, tau=1.0)
    shapes = {name: tuple(components.shape) for name, (components, _, _) in our_stats.items()}
    assert shapes == {
        "model.layers.0.self_attn.q_proj": (6, 64),
        "model.layers.0.mlp.down_proj": (6, 96),
        "model.layers.1.self_attn.q_proj": (6, 64),
        "model.layers.1.mlp.down_proj": (6, 96),
    }
    assert all(
        values.shape == (components.shape[1],) for components, values, _ in our_stats.values()
    )
    moments = _InputMoments()
    moments.add(torch.randn(50, 12, generator=torch.Generator().manual_seed(0)))
    full, full_values = explained_variance(moments)
    leading, values = explained_variance(moments, 5)
    assert full.shape == (12, 12) and leading.shape == (5, 12)
    torch.testing.assert_close(leading, full[:5], rtol=0, atol=1e-12)
    torch.testing.assert_close(values, full_values, rtol=0, atol=0)


# ------------------------------------------------------------------ 5: an unknown adapter
def test_an_unknown_adapter_name_is_refused_with_the_adapters_there_are():
    model = lorakit.get_peft_model(
        tiny_models.llama(),
        lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva"),
    )
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'other'.*\['default'\]"):
        lorakit.initialize_lora_eva_weights(model, _batches(1), adapter_name="other")
    with pytest.raises(ValueError, match="unknown adapter 'other'"):  # (PEFT's type too)
        lorakit.initialize_lora_eva_weights(model, _batches(1), adapter_name="other")
