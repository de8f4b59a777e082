"""EVA review 32 against PEFT 0.21.2 (the oracle; its randomised incremental PCA replaced by the
exact, full-rank one so that both compute the same components) and a float64 PCA:

1. a batch with fewer counted tokens than an input's components (labels all -100) is skipped
   for that input, as PEFT's ``SVDHook`` skips it: no rows added, no convergence step (it used
   to recompute unchanged components, cos 1 >= tau, and stop reading after 2 batches);
2. the convergence test compares signed cosines of PEFT-signed components (was ``|cos|``);
3. A's rows carry PEFT's signs (largest-magnitude entry positive);
4. layers sharing an input split tied ratios as PEFT's ``_get_rank_distribution`` does."""

from __future__ import annotations

import collections
import types
import warnings

import peft
import peft.tuners.lora.eva as peft_eva
import pytest
import torch

import lorakit
import lorakit.eva
from lorakit.eva_statistics import explained_variance, redistribute_ranks
from tests import tiny_models
from tests.eva_oracle import lorakit_statistics, peft_svd_hooks, token_counts

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def exact_peft(monkeypatch):
    """PEFT's SVDHook with a full-SVD incremental PCA; {layer: tokens its statistics hold}."""
    return peft_svd_hooks(monkeypatch, every_component=False)


@pytest.fixture
def our_stats(monkeypatch):
    """{layer input: (components, eigenvalues, tokens)} as lorakit's EVA ends."""
    return lorakit_statistics(monkeypatch)


def _batches(count: int, size: int = 8, length: int = 20, seed: int = 4) -> list[dict]:
    """Language-model batches: padding on the first row, the first 4 positions a prompt."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (size, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _ours(fields, batches, **eva):
    model = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(**fields, eva_config=lorakit.EvaConfig(**eva))
    )
    lorakit.initialize_lora_eva_weights(model, batches)
    return model


def _theirs(fields, batches, **eva):
    model = peft.get_peft_model(
        tiny_models.llama(), peft.LoraConfig(**fields, eva_config=peft.EvaConfig(**eva))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    return model


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {
        key[key.index("layers.") :].replace(".default", ""): value  # (the Llama's layers)
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


# ------------------------------------------------------------- 1: batches without enough tokens
@pytest.mark.parametrize("counted", [0, 1])
def test_a_batch_with_too_few_counted_tokens_is_skipped_as_peft_skips_it(
    counted, exact_peft, our_stats
):
    """Batch 2 counts 0 or 1 tokens (< the 8 components wanted): PEFT skips it, so EVA must
    give what it gives without that batch, and PEFT's ranks, A and token counts (the same
    batches read per input). Was: lorakit judged every layer converged on it and stopped after
    2 batches (A off by up to 0.59)."""
    fields = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="eva"
    )
    batches = _batches(30)
    batches[1]["labels"][:] = -100
    batches[1]["labels"][0, 10 : 10 + counted] = 7
    eva = dict(rho=2.0, tau=0.9)
    ours, theirs = _ours(fields, batches, **eva), _theirs(fields, batches, **eva)
    _assert_equal_to_peft(ours, theirs)
    assert token_counts(our_stats) == exact_peft
    without = _ours(fields, batches[:1] + batches[2:], **eva)
    assert without.peft_config["default"].rank_pattern == ours.peft_config["default"].rank_pattern
    for key, value in _lora_a(without).items():
        torch.testing.assert_close(_lora_a(ours)[key], value, rtol=0, atol=0)


def _single_examples() -> list[dict]:
    """Batches of one example, right-padded, counting 1, 7, 0, 12 and 4 tokens."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for length in [3, 9, 1, 14, 6]:
        ids = torch.randint(0, 128, (1, 16), generator=generator)
        mask = torch.zeros_like(ids)
        mask[0, :length] = 1
        labels = ids.clone()
        labels[0, :2] = -100
        labels[mask == 0] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _counted_rows(name: str, batches: list[dict]) -> list[torch.Tensor]:
    """Per batch, the base model's inputs of layer ``name`` at its counted positions."""
    inputs: list[torch.Tensor] = []
    base = tiny_models.llama()
    handle = base.get_submodule(name).register_forward_pre_hook(
        lambda module, args: inputs.append(args[0])
    )
    with torch.no_grad():
        for batch in batches:
            base(**batch)
    handle.remove()
    return [
        x[batch["attention_mask"].bool() & (batch["labels"] != -100)]
        for x, batch in zip(inputs, batches, strict=True)
    ]


def _pca(rows: list[torch.Tensor], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 principal directions (count, k) of ``rows``, each with its largest |entry|
    positive (PEFT's signs), and the singular values of the centred rows."""
    x = torch.cat(rows).double()
    _, singular, right_t = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    directions = right_t[:count]
    signs = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    return directions * signs, singular[:count]


@pytest.mark.parametrize("whiten", [False, True])
def test_tau_one_reads_every_batch_with_enough_tokens(whiten):
    """tau = 1 never converges: A must be the float64 PCA of the counted tokens of every batch
    that has at least r * rho = 3 of them (the 1- and 0-token batches are skipped, as in
    PEFT); whitened rows divided by the square roots of its singular values. Was: the 0-token
    batch stopped the reading (A from 7 tokens, off by 0.45)."""
    fields = dict(
        r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights="eva"
    )
    batches = _single_examples()
    model = _ours(fields, batches, rho=1.0, tau=1.0, whiten=whiten)
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        counted = [rows for rows in _counted_rows(name, batches) if rows.shape[0] >= 3]
        assert sum(rows.shape[0] for rows in counted) == 23
        expected, singular = _pca(counted, 3)
        if whiten:
            expected = expected / singular.sqrt()[:, None]
        lora_a = model.model.get_submodule(name).lora_A["default"].weight.double()
        torch.testing.assert_close(lora_a, expected, rtol=0, atol=1e-5, msg=name)


def test_a_loader_with_no_batch_big_enough_uses_all_its_tokens():
    """Every batch counts fewer tokens than the 8 components wanted (PEFT would cycle the loader
    for ever): the input's components come from all its 12 counted tokens (fewer than 8 are
    refused: tests/test_eva_plan_review38.py)."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="eva")
    batches = _single_examples()
    batches = [batches[0], batches[1], batches[4], batches[2]]  # 1, 7, 4, 0 tokens
    model = _ours(fields, batches, rho=2.0, tau=1.0)
    name = "model.layers.0.self_attn.q_proj"
    rows = _counted_rows(name, batches)
    assert [r.shape[0] for r in rows] == [1, 7, 4, 0]
    expected, _ = _pca(rows, 4)
    lora_a = model.model.get_submodule(name).lora_A["default"].weight.double()
    torch.testing.assert_close(lora_a, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------- 2: the signed convergence test
def test_convergence_reads_as_many_batches_as_peft(exact_peft, our_stats):
    """Every layer converges within the 50 batches: each input must read PEFT's batches (layer
    1's o_proj: 45; with |cos| lorakit stopped it after 38, where its component 7 flipped sign
    between two batches, cos -0.99924) and give PEFT's ranks and A."""
    fields = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights="eva")
    batches = _batches(50)
    ours, theirs = (
        _ours(fields, batches, rho=2.0, tau=0.99),
        _theirs(fields, batches, rho=2.0, tau=0.99),
    )
    assert token_counts(our_stats) == exact_peft
    assert token_counts(our_stats)["model.layers.1.self_attn.o_proj"] == 45 * (8 * 16 - 3)
    _assert_equal_to_peft(ours, theirs)


# ------------------------------------------------------------- 3: signs
def test_components_have_peft_signs():
    """Each component's largest-magnitude entry is positive (PEFT's svd_flip)."""
    generator = torch.Generator().manual_seed(0)
    from lorakit.eva_statistics import _InputMoments

    moments = _InputMoments()
    moments.add(torch.randn(50, 6, generator=generator) @ torch.randn(6, 6, generator=generator))
    components, _ = explained_variance(moments)
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    assert (largest > 0).all()


# ------------------------------------------------------------- 3 + 4: one batch against PEFT
@pytest.mark.parametrize(
    "eva",
    [
        dict(rho=2.0),
        dict(rho=1.0),
        dict(rho=2.0, adjust_scaling_factors=False),
        dict(rho=3.0, use_label_mask=False),
    ],
)
def test_one_batch_gives_peft_ranks_and_signed_a(eva, exact_peft):
    """One batch, all linear layers: PEFT's ranks (rho = 2: layer 1's k/v get 3/4, lorakit gave
    4/3) and A row by row with PEFT's signs (24 of 49 rows had the opposite sign)."""
    fields = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights="eva")
    batches = _batches(1, length=40)
    _assert_equal_to_peft(_ours(fields, batches, **eva), _theirs(fields, batches, **eva))


# ------------------------------------------------------------- 4: ties, against PEFT's function
def _peft_rank_distribution():
    """PEFT's ``_get_rank_distribution`` (a function local to ``_get_eva_state_dict``)."""
    code = next(
        const
        for const in peft_eva._get_eva_state_dict.__code__.co_consts
        if isinstance(const, types.CodeType) and const.co_name == "_get_rank_distribution"
    )
    return types.FunctionType(code, vars(peft_eva))


@pytest.mark.parametrize("seed", range(40))
def test_tied_ratios_split_as_peft_splits_them(seed):
    """Random layers, some reading one input (their ratios equal), random ranks and rho:
    redistribute_ranks must give PEFT's counts (list order, its unstable argsort, its swaps)."""
    generator = torch.Generator().manual_seed(seed)
    names = [f"layer{i}" for i in range(int(torch.randint(4, 12, (1,), generator=generator)))]
    leader, lead = {}, None
    for name in names:  # runs of 1-3 layers share an input with the run's first layer
        if lead is None or torch.rand(1, generator=generator) < 0.5:
            lead = name
        leader[name] = lead
    ranks = {name: int(torch.randint(1, 5, (1,), generator=generator)) for name in names}
    rho = float(torch.tensor([1.0, 1.5, 2.0, 3.0])[torch.randint(0, 4, (1,), generator=generator)])
    values = {
        lead: torch.rand(12, generator=generator).sort(descending=True).values
        for lead in set(leader.values())
    }
    values = {lead: (v / v.sum()).float() for lead, v in values.items()}  # PEFT's dtype
    ratios = {name: values[leader[name]].double() for name in names}
    ours = redistribute_ranks(ratios, ranks, rho, shared_input=leader)
    groups = collections.defaultdict(list)
    for name in names:
        groups[leader[name]].append(name)
    equal_inputs_map = {m: g[0] for g in groups.values() if len(g) > 1 for m in g[1:]}
    hooks = {
        name: (
            types.SimpleNamespace(
                svd=types.SimpleNamespace(explained_variance_ratio_=values[name])
            ),
        )
        for name in names
        if name not in equal_inputs_map
    }
    max_components = {name: round(ranks[name] * rho) for name in names}
    for group in groups.values():
        for name in group:
            max_components[name] = max(max_components[m] for m in group)
    layer_hook_map = {**{name: name for name in hooks}, **equal_inputs_map}
    theirs = _peft_rank_distribution()(
        hooks, layer_hook_map, equal_inputs_map, sum(ranks.values()), max_components
    )
    assert ours == theirs
