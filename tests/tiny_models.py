"""Tiny random models built from transformers configs (no download), for fast tests.

Llama uses grouped-query attention (4 heads, 2 KV heads); GPT-2's attention uses ``Conv1D``.
Also the helpers several test files share: random adapter values (``randomize_adapters``), an
adapter's tensors as a file holds them (``adapter_tensors``), and a fine-tune with a known
low-rank update (``fine_tuned``, ``UPDATE_RANKS``).
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

# The tiny decoder's sizes (GQA: 4 heads, 2 KV heads), shared by the Llama-family test models.
DECODER_SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def llama_config(**overrides) -> LlamaConfig:
    """The tiny Llama's config (``DECODER_SIZES``); ``overrides`` replace fields."""
    return LlamaConfig(**(DECODER_SIZES | overrides))


def llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).to(dtype).eval()


def save_llama_with_tokenizer(directory, tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Save a tiny random Llama sized to ``tokenizer`` plus the tokenizer into ``directory``
    (a local model directory like a hub checkout, without any download); returns the model."""
    torch.manual_seed(seed)
    config = llama_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **overrides
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


MOE_SIZES = dict(DECODER_SIZES, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)


def mixtral(seed: int = 0, dtype: torch.dtype = torch.float32) -> MixtralForCausalLM:
    """A tiny Mixtral: 4 experts a layer, their weights fused into 3-D parameters stored
    (experts, out, in): ``mlp.experts.gate_up_proj`` (4, 96, 64), ``mlp.experts.down_proj``
    (4, 64, 48)."""
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**MOE_SIZES)).to(dtype).eval()


def gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    """A tiny GPT-OSS, whose experts store each weight (in, out) (``is_transposed``):
    ``mlp.experts.gate_up_proj`` (4, 64, 96), ``mlp.experts.down_proj`` (4, 48, 64)."""
    torch.manual_seed(seed)
    config = GptOssConfig(
        **MOE_SIZES,
        head_dim=16,
        layer_types=["full_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return GptOssForCausalLM(config).eval()


GPT2_SIZES = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
BERT_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    vocab_size=128,
    max_position_embeddings=64,
)


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        **GPT2_SIZES,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        **BERT_SIZES,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


BUILDERS = {"llama": llama, "gpt2": gpt2, "bert": bert}


# The tiny encoder-decoders' vocabulary (T5's and BART's, below).
SEQ2SEQ_VOCAB = 100


def t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A tiny random T5 (tied ``shared`` embedding, 2 layers, no dropout), in eval mode."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=SEQ2SEQ_VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def bart(seed: int = 0) -> BartForConditionalGeneration:
    """A tiny random BART (``model.shared`` tied to the head, 2+2 layers, no dropout), eval."""
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=SEQ2SEQ_VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    return BartForConditionalGeneration(config).eval()


def input_ids(batch: int = 2, length: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def sgd_steps(
    model: torch.nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 0.05
) -> list[torch.nn.Parameter]:
    """A few plain SGD steps on the language-model loss of ``ids`` over every parameter that
    requires grad (the adapters); returns those parameters."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return parameters


def randomize_adapters(model: torch.nn.Module, seed: int = 3, std: float = 0.05) -> None:
    """Give every LoRA tensor a non-zero random value (so merges cannot pass trivially)."""
    from lorakit.state import lora_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter_name in layer.adapter_names:
                for parameter in layer.adapter_parameters(adapter_name):
                    noise = torch.randn(parameter.shape, generator=generator) * std
                    parameter.copy_(noise.to(parameter.dtype))


def adapter_tensors(reference, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of ``adapter`` in the injected ``reference`` (what a file holds)."""
    from lorakit.state import lora_layers

    tensors = {}
    for path, layer in lora_layers(reference):
        if adapter in layer.ranks:
            lora_A, lora_B = layer.adapter_parameters(adapter)
            tensors[f"base_model.model.{path}.lora_A.weight"] = lora_A.detach().clone()
            tensors[f"base_model.model.{path}.lora_B.weight"] = lora_B.detach().clone()
    return tensors


# The rank of the update ``fine_tuned`` adds, per module type.
UPDATE_RANKS = {"q_proj": 2, "v_proj": 4, "down_proj": 3}


def fine_tuned(
    base: torch.nn.Module, noise: float = 1e-4, seed: int = 7, ranks: dict | None = None
) -> torch.nn.Module:
    """``base`` + a rank-``ranks[type]`` update (norm 0.5) + Gaussian noise in each such layer."""
    ranks = UPDATE_RANKS if ranks is None else ranks
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            rank = ranks.get(name.rsplit(".", 1)[-1])
            if rank is None:
                continue
            d, k = module.weight.shape
            left = torch.randn(d, rank, generator=generator)
            right = torch.randn(rank, k, generator=generator)
            update = left @ right
            module.weight += 0.5 * update / update.norm()
            module.weight += noise * torch.randn(d, k, generator=generator)
    return tuned


def bnb_4bit_from(directory, quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    """The model saved in ``directory`` loaded by transformers itself with bitsandbytes 4-bit
    (``quant_type`` nf4 / fp4), in training mode (no CPU repacking)."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=config, device_map="cpu", dtype=torch.float32
        )
    return model.train()
