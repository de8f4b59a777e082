"""The demo's adapter answered by llama.cpp (issue 18 item 5).

``lorakit demo`` trains a LoRA adapter on SmolLM2-135M-Instruct for Rotten Tomatoes sentiment and
scores the held-out test reviews by the next-token log-probabilities of its two answers. This
script exports that adapter to GGUF (``lorakit.export.gguf_adapter``) and scores the same
reviews through llama.cpp (``llama-cpp-python``) on a GGUF base, by default the packaged Q4_1
file the built-in model is converted from (what a user deploying there runs):

    prompt   = exactly the demo's prompt tokens (``fit_example`` to ``max_length``, then
               ``prompt_token_ids``: the chat template up to ``<|im_start|>assistant\\n``)
    score_j  = log_softmax(llama.cpp logits at the prompt's last token)[first token of choice j]
    predict  = argmax_j score_j

with and without the adapter, next to the demo's own numbers (``summary.json``) and its
per-review predictions (``predictions.jsonl``). The prompt tokens come from lorakit's tokenizer;
the script also counts how many prompts llama.cpp's own tokenizer encodes to the same tokens
(what a user sending the text would get). llama.cpp runs with its default settings (f16 KV
cache) except one: its CPU weight repacking ("extra buffer types", llama-cli's ``--no-repack``)
is off, because with it llama.cpp (0.3.36 here) crashes in its first decode on the Q4_1 file on
this machine's CPU (AVX-512 + AMX); ``--repack`` turns it back on.

Run (2 CPU threads; about a minute per pass on a quiet machine):
    lorakit demo --output runs/demo
    PYTHONPATH=src python experiments/llama_cpp_demo.py runs/demo
Writes experiments/results/llama_cpp_demo.json (``--output``) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lorakit import data
from lorakit.data.scoring import choice_token_ids
from lorakit.data.tokenize import fit_example, prompt_token_ids
from lorakit.export.llama_cpp import weight_repacking

RESULTS = Path(__file__).parent / "results" / "llama_cpp_demo.json"


def held_out_prompts(settings: dict, tokenizer) -> tuple[list[list[int]], list[int], list[int]]:
    """``(prompt tokens, choice token ids, labels)`` of the demo's held-out reviews, built as
    ``lorakit.data.score_choices`` builds them."""
    examples = data.load_examples("rotten-tomatoes", "test", style=settings["style"])
    examples = examples[: settings["eval_size"]]
    max_length = settings["max_length"]
    fitted = [fit_example(example, tokenizer, max_length) for example in examples]
    prompts = [prompt_token_ids(example, tokenizer)[-max_length:] for example in fitted]
    return prompts, choice_token_ids(examples[0].choices, tokenizer), [e.label for e in examples]


def llama_cpp_scores(base: Path, adapter: Path | None, prompts, choices, threads: int):
    """(N, C) log-probabilities of the choices at each prompt's last token, by llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(base),
        lora_path=None if adapter is None else str(adapter),
        n_ctx=max(len(p) for p in prompts) + 8,
        n_threads=threads,
        logits_all=True,
        verbose=False,
    )
    scores = np.empty((len(prompts), len(choices)))
    try:
        for row, prompt in enumerate(prompts):
            llm.reset()
            llm.eval(prompt)
            logits = np.asarray(llm.scores[len(prompt) - 1], dtype=np.float64)
            log_probs = logits - np.logaddexp.reduce(logits)
            scores[row] = log_probs[choices]
    finally:
        llm.close()
    return scores


def same_tokens_by_llama_cpp(base: Path, prompts, tokenizer) -> int:
    """How many prompts llama.cpp's tokenizer (special tokens parsed) encodes to lorakit's."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(base), n_ctx=16, verbose=False)
    try:
        return sum(
            llm.tokenize(tokenizer.decode(p).encode(), add_bos=False, special=True) == p
            for p in prompts
        )
    finally:
        llm.close()


def accuracy(predictions, labels) -> float:
    return sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels)


def main() -> None:
    from lorakit.export.gguf_adapter import export_adapter
    from lorakit.meta_model import build_meta_model
    from lorakit.models import builtin_gguf_file, load_tokenizer, resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path, help="a `lorakit demo --output` directory")
    parser.add_argument("--base", type=Path, help="GGUF base (default: the packaged Q4_1 file)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repack", action="store_true", help="llama.cpp's weight repacking on")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    summary = json.loads((args.demo / "summary.json").read_text())
    settings = summary["settings"]
    model = settings["model"]
    base = args.base or builtin_gguf_file(model)
    tokenizer = load_tokenizer(resolve_model(model))
    prompts, choices, labels = held_out_prompts(settings, tokenizer)
    meta_model, _ = build_meta_model(model)
    adapter = export_adapter(args.demo / "adapter", meta_model, args.demo / "adapter.gguf").path
    demo_rows = [
        json.loads(line) for line in (args.demo / "predictions.jsonl").read_text().splitlines()
    ]
    result = {"base": str(base), "adapter": str(adapter), "held_out_reviews": len(prompts)}
    for name, lora, demo_key in (
        ("zero_shot", None, "zero_shot"),
        ("fine_tuned", adapter, "fine_tuned"),
    ):
        started = time.perf_counter()
        with weight_repacking(args.repack):
            scores = llama_cpp_scores(base, lora, prompts, choices, args.threads)
        predictions = scores.argmax(axis=1).tolist()
        lorakit_predictions = [row[demo_key] for row in demo_rows]
        result[name] = {
            "llama_cpp_accuracy": accuracy(predictions, labels),
            "lorakit_accuracy": summary[f"{name}_accuracy"],
            "predictions_equal_to_lorakit": sum(
                a == b for a, b in zip(predictions, lorakit_predictions, strict=True)
            ),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(name, result[name], flush=True)
    with weight_repacking(args.repack):
        alike = same_tokens_by_llama_cpp(base, prompts, tokenizer)
    result["prompts_tokenized_alike_by_llama_cpp"] = alike
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
