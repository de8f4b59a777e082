"""Issue 14's QLoRA benchmarks: LoRA on a bitsandbytes 4-bit (NF4, double quantization) base.

SmolLM2-135M shapes (fewer layers), the seven projections of every block stored as
``bnb.nn.Linear4bit`` (compute dtype float32; the output layer stays float, as transformers'
bitsandbytes loading keeps it), adapters r=16 alpha=32 on all seven, dropout 0.05, batch
4 x 128, AdamW. Every contender runs in this one process, alternated, medians (docs/
performance.md, "How we measure"):

- training step: ``lorakit`` and ``peft`` (``peft.tuners.lora.bnb``) on the same 4-bit model,
  and ``frozen`` (the 4-bit model with no adapter, ``inputs_embeds.requires_grad_()``, forward +
  backward: the floor of any LoRA step on that base);
- training memory, in QLoRA's setting (a bfloat16 model whose projections are NF4 computing in
  bfloat16; 30 layers, the real depth, ``--memory-layers``): ``weights + saved for backward +
  gradients + AdamW states``, counted from the tensors (deterministic: each storage once, the
  4-bit layers by what they store), for lorakit on the 4-bit base, on the bf16 base (fp32
  adapters) and for PEFT on the 4-bit base; beside it the peak-RSS delta of a step (noisy:
  allocator caching), for scale. We count rather than read RSS because the contenders share one
  process (RSS only grows, and freed blocks stay cached), and the count is what a device holds;
- decode (``generate``, greedy, 16 new tokens after 8, batch 1) and prefill (one forward of
  1 x 256): lorakit with its adapter unmerged on the 4-bit base, against (a) the 4-bit base
  alone with bitsandbytes' CPU repack off, as lorakit keeps it (the same arithmetic: the stored
  NF4 bytes; ``decode unmerged / base``), (b) the 4-bit base alone as bitsandbytes runs it by
  default (on a CPU with AVX512-BF16 each layer's bytes are repacked for a faster kernel at its
  first eval no-grad forward, done in the warm-up round) and (c) PEFT's adapter on a fresh
  4-bit model with bitsandbytes' defaults (repack included), as a PEFT user gets it, the same
  adapter weights; and (d) lorakit with ``use_bnb_cpu_kernel`` (``--bnb-cpu-kernel``: that
  repack on purpose, inference only) against (b) and (c). lorakit turns the repack off on any
  model it adapts unless asked, to keep the stored bytes (exact, mergeable; docs/quantized.md). The JSON records whether the CPU has
  AVX512-BF16 and, per inference contender, whether its layers ended up repacked.

    python benchmarks/bench_quantized.py [--quick] [--threads 2] [--layers 4] [--repeats 5]
        [--memory-layers 30]
"""

from __future__ import annotations

import common
import torch
from torch import nn

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"training lorakit / peft": 0.90, "decode unmerged / base": 1.10}
TARGETS["prefill unmerged / base"] = 1.10
# Against bitsandbytes' defaults (its CPU repack on where the CPU has AVX512-BF16): ratio name ->
# (numerator, denominator), contenders of ``inference_contenders``. No targets.
BNB_DEFAULT_RATIOS = {
    "decode unmerged / base (bnb default)": ("decode lorakit", "decode base (bnb default)"),
    "prefill unmerged / base (bnb default)": ("prefill lorakit", "prefill base (bnb default)"),
    "decode lorakit / peft (bnb default)": ("decode lorakit", "decode peft (bnb default)"),
    "prefill lorakit / peft (bnb default)": ("prefill lorakit", "prefill peft (bnb default)"),
    # lorakit with --bnb-cpu-kernel (bitsandbytes' packed kernel, on purpose, inference only)
    "decode kernel / base (bnb default)": ("decode lorakit kernel", "decode base (bnb default)"),
    "prefill kernel / base (bnb default)": ("prefill lorakit kernel", "prefill base (bnb default)"),
    "decode kernel / peft (bnb default)": ("decode lorakit kernel", "decode peft (bnb default)"),
    "prefill kernel / peft (bnb default)": ("prefill lorakit kernel", "prefill peft (bnb default)"),
}


def lora_fields() -> dict:
    return dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=SEVEN, task_type="CAUSAL_LM")


def to_4bit(
    model: nn.Module, compute_dtype: torch.dtype = torch.float32, keep_storage: bool = True
) -> nn.Module:
    """``model`` with every projection replaced, in place, by an NF4 ``Linear4bit`` (double
    quantization, computing in ``compute_dtype``), quantized on the CPU from its weight.
    ``keep_storage``: turn bitsandbytes' eval-mode CPU repack off (``keep_4bit_storage``, as
    lorakit does on any model it adapts); False keeps bitsandbytes' default (repack on where
    the CPU has AVX512-BF16), as a PEFT user gets it."""
    import bitsandbytes as bnb

    from lorakit.quantized.loading import keep_4bit_storage

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.endswith(tuple(SEVEN)):
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                module.weight.detach().float().clone(),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))
    if keep_storage:
        keep_4bit_storage(model)  # eval mode: the stored bytes, not bitsandbytes' CPU repack
    return model.requires_grad_(False)


def repacked(model: nn.Module) -> bool:
    """Whether any 4-bit layer of ``model`` holds bitsandbytes' CPU-repacked bytes
    (``quant_state.packing_format_for_cpu``, set by its first eval no-grad forward)."""
    from lorakit.quantized.bnb import is_repacked

    return any(is_repacked(module) for module in model.modules())


def cpu_has_avx512_bf16() -> bool:
    """bitsandbytes' own test for the CPU repack (``functional.has_avx512bf16``)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def adapted(base_of, library: str) -> nn.Module:
    """A fresh base from ``base_of()`` with the adapter of ``library``, B non-zero (seeded, so
    every model built here holds the same adapter weights)."""
    model = base_of()
    if library == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**lora_fields()))
    else:
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(**lora_fields()))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in sorted(model.named_parameters()):
            if "lora_" in key:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.02)
    return model.train()


def training_step(model, ids):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def run():
        if optimizer is None:  # the frozen floor: gradient to the input embeddings only
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            model(inputs_embeds=embeds, labels=ids).loss.backward()
            return
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return run


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors, each storage once: parameters, buffers and the 4-bit
    layers' quantization state (absmax, nested absmax: not parameters in bitsandbytes)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors.append(state.absmax)
            if state.nested:
                tensors += [state.state2.absmax, state.offset]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def training_memory(model, ids) -> dict[str, int]:
    """The footprint of a training step, counted: weights + saved for backward + gradients and
    AdamW's two states (float32, like the adapter) of the trainable parameters."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved = common.saved_tensor_bytes(
        lambda: model(input_ids=ids, labels=ids).loss, list(model.parameters())
    )
    model.zero_grad(set_to_none=True)
    weights = stored_bytes(model)
    return {"weights": weights, "saved": saved, "optimizer": 3 * trainable}


def memory_footprints(args, batch: int, length: int):
    """Training footprints (``training_memory``) and peak-RSS deltas of a step, in the QLoRA
    setting: a bfloat16 model (embeddings, output layer, norms) whose projections are NF4
    computing in bfloat16, beside the bfloat16 model itself; ``--memory-layers`` deep."""
    import copy

    config = common.smollm2_config(args.memory_layers, args.quick)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.manual_seed(0))
    bf16_base = common.base_model(config, torch.bfloat16)

    def base_4bit():
        return to_4bit(copy.deepcopy(bf16_base), torch.bfloat16).train()

    models = {
        "lorakit 4-bit": adapted(base_4bit, "lorakit"),
        "peft 4-bit": adapted(base_4bit, "peft"),
        "lorakit bf16": adapted(lambda: copy.deepcopy(bf16_base).train(), "lorakit"),
    }
    memory = {name: training_memory(model, ids) for name, model in models.items()}
    rss = {name: common.peak_rss_delta(training_step(m, ids)) for name, m in models.items()}
    return memory, rss


def inference_runs(model, prompt, long_ids):
    def decode():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)

    def prefill():
        with torch.no_grad():
            model(input_ids=long_ids)

    return decode, prefill


def inference_contenders(models: dict[str, nn.Module], prompt, long_ids) -> dict:
    """``{"decode NAME": run, ..., "prefill NAME": run, ...}`` for ``{NAME: model}``, each
    model in eval mode: every decode, then every prefill, for ``common.alternate``."""
    runs = {name: inference_runs(model.eval(), prompt, long_ids) for name, model in models.items()}
    decodes = {f"decode {name}": decode for name, (decode, _) in runs.items()}
    return {**decodes, **{f"prefill {name}": prefill for name, (_, prefill) in runs.items()}}


def inference_times(args, ours, frozen, float_base, ids):
    """Medians and times of decode and prefill: lorakit unmerged (``ours``), the 4-bit base with
    the repack off (``frozen``), and, built here from ``float_base`` with bitsandbytes' defaults,
    the 4-bit base alone and PEFT's adapter on it; returns (times, medians, repack per model)."""
    import copy

    def default_4bit():
        return to_4bit(copy.deepcopy(float_base), keep_storage=False).train()

    from lorakit.quantized.bnb_cpu_kernel import use_bnb_cpu_kernel

    models = {
        "lorakit": ours,
        "base": frozen,
        "base (bnb default)": default_4bit(),
        "peft (bnb default)": adapted(default_4bit, "peft"),
    }
    if cpu_has_avx512_bf16():  # (elsewhere bitsandbytes has no such kernel)
        models["lorakit kernel"] = copy.deepcopy(ours).eval()
        use_bnb_cpu_kernel(models["lorakit kernel"])
    prompt, long_ids = ids[:1, :8], ids[:1].repeat(1, 2)[:, : (32 if args.quick else 256)]
    times = common.alternate(inference_contenders(models, prompt, long_ids), args.repeats)
    medians = {name: common.median(values) for name, values in times.items()}
    return times, medians, {name: repacked(model) for name, model in models.items()}


def main() -> None:
    parse = common.parser(__doc__.splitlines()[0], "quantized")
    parse.add_argument("--memory-layers", type=int, default=30, help="for memory (real: 30)")
    args = parse.parse_args()
    torch.set_num_threads(args.threads)
    clock = common.set_clock(args.clock, args.threads)
    config = common.smollm2_config(args.layers, args.quick)
    if args.quick:  # bitsandbytes' CPU repack needs in_features a multiple of its 64-block
        config.intermediate_size = 128
    batch, length = (2, 16) if args.quick else (4, 128)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.manual_seed(0))
    float_base = common.base_model(config)

    def base_4bit():
        import copy

        return to_4bit(copy.deepcopy(float_base)).train()

    ours, theirs, frozen = adapted(base_4bit, "lorakit"), adapted(base_4bit, "peft"), base_4bit()
    steps = {
        "lorakit": training_step(ours, ids),
        "peft": training_step(theirs, ids),
        "frozen": training_step(frozen, ids),
    }
    times = common.alternate(steps, args.repeats)
    med = {name: common.median(values) for name, values in times.items()}

    memory, rss = memory_footprints(args, batch, length)
    total = {name: sum(parts.values()) for name, parts in memory.items()}

    inference, inf, repack = inference_times(args, ours, frozen, float_base, ids)

    ratios = {
        "training lorakit / peft": med["lorakit"] / med["peft"],
        "training lorakit / frozen": med["lorakit"] / med["frozen"],
        "memory 4-bit / bf16 (lorakit)": total["lorakit 4-bit"] / total["lorakit bf16"],
        "memory lorakit / peft (4-bit)": total["lorakit 4-bit"] / total["peft 4-bit"],
        "decode unmerged / base": inf["decode lorakit"] / inf["decode base"],
        "prefill unmerged / base": inf["prefill lorakit"] / inf["prefill base"],
    }
    rows = [
        (
            name,
            f"{value:.3f}",
            f"<= {TARGETS[name]:.2f}" if name in TARGETS else "-",
            ("yes" if value <= TARGETS[name] else "no") if name in TARGETS else "-",
        )
        for name, value in ratios.items()
    ]
    against_default = {
        name: inf[a] / inf[b] for name, (a, b) in BNB_DEFAULT_RATIOS.items() if a in inf
    }
    rows += [(name, f"{value:.3f}", "-", "-") for name, value in against_default.items()]
    print(common.table(rows, ("ratio", "median", "target", "met")))
    print(f"CPU has AVX512-BF16: {cpu_has_avx512_bf16()}; bitsandbytes' CPU repack on: {repack}")
    for name, parts in memory.items():
        print(f"{name}: {parts} = {total[name] / 1e6:.1f} MB; peak RSS delta of a step {rss[name]}")
    common.write_json(
        args.out,
        {
            "settings": {
                "layers": config.num_hidden_layers,
                "memory_layers": args.memory_layers,
                "batch": [batch, length],
                "threads": args.threads,
                "repeats": args.repeats,
                "clock": clock,
                "quick": args.quick,
                "lora": lora_fields(),
                "base": "bitsandbytes NF4, double quantization; times: float32 model, compute "
                "float32; memory: bfloat16 model, compute bfloat16",
                "cpu_avx512_bf16": cpu_has_avx512_bf16(),
                "inference_repack": repack,
            },
            "versions": common.versions(),
            "seconds": {**times, **inference},
            "medians": {**med, **inf},
            "memory_bytes": memory,
            "memory_total_bytes": total,
            "peak_rss_delta_bytes": rss,
            "ratios": ratios,
            "inference_ratios_bnb_default": against_default,
            "targets": TARGETS,
        },
    )


if __name__ == "__main__":
    main()
