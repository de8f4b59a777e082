"""Issue 24, part 2: the SAID intrinsic dimension d90 of SmolLM2-135M-Instruct on the demo's task.

The protocol of ``said_study.py`` (MiniLM-L6) on the decoder and task of ``smollm2_rank.py``:
Rotten Tomatoes reviews in the chat template, the answer ("positive" / "negative") learnt as the
assistant turn (mean CE over the answer tokens), accuracy = ``lorakit.data.classify`` (next-token
log-probability of the two answers, as ``lorakit demo`` scores) on the first ``EVAL_SIZE`` = 200
reviews of the test split. Reused, not copied: ``smollm2_rank.setup`` / ``accuracy`` and its loop's
pieces (``BatchOrder``, ``batch_loss_sum``, ``build_optimizer``, clipping at 1.0, batch
``BATCH`` = 8 reviews of at most ``MAX_LENGTH`` = 96 tokens, one thread); from ``said_study``
the early-stopping loop, the resumable rows (``read_rows``, ``append_row``, ``key``,
``train_all``), the lr chosen per d on validation (``best_lr``) and the report with both d90
definitions and their bootstrap interval over seeds (``report``).

Methods (one JSON row each in ``results/<name>.runs.jsonl``, keyed by method / d / lr / seed):

- ``frozen``: the untouched model (zero-shot; one row, seed 0: nothing is random).
- ``full``: full fine-tuning as smollm2_rank's ``full``: the 30 blocks and the final norm
  (D = 106,203,456 numbers in 271 tensors); the token embedding, tied to the LM head, is frozen.
- ``said``: θ_D = exactly the parameters ``full`` trains (the same D, the tied embedding frozen),
  θ_D^(i) = θ_0^(i) + λ_i (P θ_d)^(i), P Fastfood (``IntrinsicDimension``), one λ_i per tensor
  (init 1); d counted as len(θ_d) + 271. Subspace seed = run seed. So ``full`` and ``said`` move
  the same parameters and differ only in the parametrisation.

Each run: AdamW (no weight decay), linear warm-up over ``--warmup`` steps then constant
(``build_scheduler`` with min_lr_ratio 1), gradient clipping at 1.0, batch 8, batches drawn by
``BatchOrder`` from the run seed; validation accuracy every ``--eval-every`` steps; stops after
``--patience`` evaluations without improvement or at ``--max-steps``; the best-validation state is
restored and scored on the test reviews. Validation = the last ``--val-size`` reviews of the
training split (the model trains on the others, the first ``--train-size`` of them: all by
default, 10,011; never on test). ``--budget-minutes``: no new run starts after the budget.

Differences from Aghajanyan et al. 2020 (SAID on BERT / RoBERTa, MRPC and QQP):
- a 135M decoder answering with its pretrained LM head, not an encoder with a new classification
  head: nothing is new, and the LM head (tied to the token embedding, 28.3M of the 134.5M
  numbers) is frozen and outside θ_D, in the full fine-tuning baseline too; the weights are
  SmolLM2's 4-bit GGUF dequantised to fp32 (``lorakit.models``);
- one task (Rotten Tomatoes sentiment, 10,011 training reviews), accuracy on 200 test reviews
  (the paper: GLUE dev sets), validation carved from the training reviews (200);
- this loop's optimiser (AdamW, warm-up then constant lr, clipping, batch 8, 96 tokens), lr chosen
  per d from a small ``--lrs`` grid on validation, early stopping by patience, a coarse d grid and
  few seeds, on CPU in fp32; the paper's fine-tuning recipe and d grid are not reproduced;
- d90 both as the paper defines it (90% of full fine-tuning's accuracy) and of the gain over the
  frozen model (zero-shot here), each with a bootstrap interval over seeds.

Cost (``--measure 3``: one thread, fp32, on 2 cores that were both running a niced said_study
process, so upper bounds). Seconds per training step (median of 3): full 6.3; SAID d = 1,000
12.8, d = 10,000 17.1, d = 100,000 16.1 (the Fastfood map over D = 106M, forward and backward,
costs more than the model at batch 8); building SAID 12-16 s; one validation evaluation (200
reviews; SAID computes θ_D once for it) 30-34 s. Peak RSS: full 3.8 GiB; SAID 6.4 / 7.3 / 7.1
GiB at d = 1e3 / 1e4 / 1e5. A run of N steps costs N x step + (N / 50 + 2) x ~33 s: at N = 400
about 48 min (full), 90 min (d = 1e3), 2 h (d >= 1e4); the default grid (frozen once, full x 3
seeds, d in {1e3, 1e4, 1e5} x 2 lrs x 3 seeds) about 35 core-hours at N = 400 (18 h as two
processes on 2 free cores, ~15 GiB; 11-35 h for N = 250-800).

Run (one process per core; split the grid so that no job is in two processes):
  PYTHONPATH=src OMP_NUM_THREADS=1 python3 experiments/said_decoder.py --budget-minutes 600 \\
      --methods frozen full said --dims 1000 --lrs 5e-3 2e-2 --seeds 0 1 2
  PYTHONPATH=src OMP_NUM_THREADS=1 python3 experiments/said_decoder.py --budget-minutes 600 \\
      --methods said --dims 10000 100000 --lrs 5e-3 2e-2 --seeds 0 1 2
Report only (no training):  ... said_decoder.py --report   (writes results/<name>.json)
Cost only (no rows):  ... said_decoder.py --methods full said --dims 1000 --measure 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import statistics
import time

import common
import said_study
import smollm2_rank
import torch
from smollm2_settings import BATCH, FULL_LR, MAX_LENGTH
from torch import nn
from torch.func import functional_call

from lorakit import data
from lorakit.analysis.intrinsic import IntrinsicDimension

HEAD = "tied"  # the rows' ``head``: the LM head is the tied token embedding, frozen everywhere
METHODS = ("frozen", "full", "said")


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dims", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 2e-2])
    parser.add_argument("--full-lrs", type=float, nargs="+", default=[FULL_LR])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--train-size", type=int, default=None, help="default: all the rest")
    parser.add_argument("--name", default="said_decoder")
    parser.add_argument("--report", action="store_true", help="only summarise the rows")
    parser.add_argument("--measure", type=int, metavar="STEPS", default=0, help="only time")
    args = parser.parse_args(argv)
    args.head = HEAD
    args.task = "rotten_tomatoes"  # (said_study's rows and report key on it)
    return args


def split_reviews(reviews: list, val_size: int, train_size: int | None) -> tuple[list, list]:
    """(train, val): val = the last ``val_size`` training reviews, train = the first
    ``train_size`` of the others (all by default; the first 240 are smollm2_rank's)."""
    if not 0 < val_size < len(reviews):
        raise ValueError(f"val_size {val_size} must be in 1 .. {len(reviews) - 1}")
    return reviews[:-val_size][:train_size], reviews[-val_size:]


def plan(args) -> list[tuple[str, int, float, int]]:
    """The frozen model once, full fine-tuning per lr and seed, then d ascending, lr, seed."""
    jobs = [("frozen", 0, 0.0, 0)] if "frozen" in args.methods else []
    if "full" in args.methods:
        jobs += [("full", 0, lr, s) for lr in args.full_lrs for s in args.seeds]
    if "said" in args.methods:
        jobs += [
            ("said", d, lr, s) for d in sorted(args.dims) for lr in args.lrs for s in args.seeds
        ]
    return jobs


def tasks(args) -> dict:
    """smollm2_rank's model, tokenizer and test reviews; this study's train and val reviews."""
    cache = dict(smollm2_rank.setup())
    reviews = data.load_examples("rotten-tomatoes", "train", style="chat")
    train, cache["val"] = split_reviews(reviews, args.val_size, args.train_size)
    cache["train"] = data.tokenize_examples(train, cache["tokenizer"], MAX_LENGTH)
    return cache


def theta_names(model: nn.Module) -> list[str]:
    """Freeze the token embedding (tied with the LM head); the names of every other parameter:
    what ``full`` trains and ``said`` reparametrises."""
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    return [name for name, p in model.named_parameters() if p.requires_grad]


class SubspaceLM(nn.Module):
    """``IntrinsicDimension`` behind the causal LM's own ``forward`` arguments, so that lorakit's
    loss (``logits_to_keep``) and ``data.classify`` (``position_ids`` for left padding) call it
    as they call the model. Inside ``fixed()`` θ_D is computed once (no grad) for every call."""

    def __init__(self, said: IntrinsicDimension) -> None:
        super().__init__()
        self.said = said
        self._fixed: dict[str, torch.Tensor] | None = None

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        inputs.update(position_ids=position_ids, logits_to_keep=logits_to_keep)
        params = self._fixed if self._fixed is not None else self.said.reparametrised()
        return functional_call(self.said.model, params, (), inputs, strict=False)

    @contextlib.contextmanager
    def fixed(self):
        with torch.no_grad():
            self._fixed = {n: t.detach() for n, t in self.said.reparametrised().items()}
        try:
            yield
        finally:
            self._fixed = None


def evaluate(forward: nn.Module, cache: dict, reviews: list) -> float:
    """smollm2_rank's accuracy on ``reviews``; the module is left in train mode."""
    try:
        if isinstance(forward, SubspaceLM):
            with forward.fixed():
                return smollm2_rank.accuracy(forward, {**cache, "test": reviews})
        return smollm2_rank.accuracy(forward, {**cache, "test": reviews})
    finally:
        forward.train()


def prepare(method: str, dimension: int, lr: float, seed: int, args, cache):
    """(module to call, ``step(n)``, trainable tensors, counted trainable numbers)."""
    from lorakit.train import BatchOrder, build_optimizer
    from lorakit.train.losses import batch_loss_sum, target_count
    from lorakit.train.schedule import build_scheduler

    model = copy.deepcopy(cache["model"])
    names = theta_names(model)
    if method == "frozen":
        model.requires_grad_(False)
        return model, None, [], 0
    if method == "full":
        forward, trainable = model, [p for p in model.parameters() if p.requires_grad]
        counted = common.count(trainable)
    else:
        said = IntrinsicDimension(model, dimension, names, said=True, seed=seed)
        forward, trainable = SubspaceLM(said), [said.theta_d, said.scales]
        counted = said.trainable_dimension
    tokenized = cache["train"]
    order = BatchOrder(len(tokenized.input_ids), BATCH, seed=seed)
    optimizer = build_optimizer(forward, lr)
    scheduler = build_scheduler(optimizer, args.max_steps, max(1, args.warmup), min_lr_ratio=1.0)
    torch.manual_seed(seed)
    forward.train()

    def step(number: int) -> None:
        (indices,) = order.micro_batches(number - 1)
        batch = data.collate(tokenized, indices)
        loss_sum, _, _ = batch_loss_sum(forward, batch)
        (loss_sum / target_count(batch)).backward()  # mean CE per answer token
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, step, trainable, counted


def run(method: str, dimension: int, lr: float, seed: int, args, cache) -> dict:
    """One run with early stopping (``said_study.early_stopping``); frozen: no step."""
    forward, step, trainable, counted = prepare(method, dimension, lr, seed, args, cache)
    loop = argparse.Namespace(**vars(args))
    if step is None:
        loop.max_steps = 0
    record = said_study.early_stopping(
        step,
        lambda: evaluate(forward, cache, cache["val"]),
        lambda: evaluate(forward, cache, cache["test"]),
        trainable,
        loop,
    )
    return {**record, "counted_dimension": counted, "train_size": len(cache["train"].input_ids)}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def measure(args, cache, steps: int) -> None:
    """Seconds of each of ``steps`` training steps per method and d in the plan (first lr and
    seed), of one validation evaluation, and the process's peak RSS so far (no rows)."""
    seen = set()
    for method, dimension, lr, seed in plan(args):
        if (method, dimension) in seen:
            continue
        seen.add((method, dimension))
        start = time.perf_counter()
        forward, step, _, counted = prepare(method, dimension, lr, seed, args, cache)
        built = time.perf_counter() - start
        times = []
        for number in range(1, (steps if step else 0) + 1):
            start = time.perf_counter()
            step(number)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        val = evaluate(forward, cache, cache["val"])
        evaluation = time.perf_counter() - start
        median = f"{statistics.median(times):.2f}" if times else "-"
        print(
            f"{method} d={dimension}: counted {counted:,}, build {built:.1f} s, steps "
            f"{[round(t, 2) for t in times]} s (median {median}), one validation evaluation "
            f"({len(cache['val'])} reviews, acc {val:.3f}) {evaluation:.1f} s, "
            f"peak RSS {peak_rss_gib():.2f} GiB",
            flush=True,
        )
        del forward, step


def main() -> None:
    args = arguments()
    path = common.RESULTS / f"{args.name}.runs.jsonl"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    if args.measure:
        torch.set_num_threads(1)
        measure(args, tasks(args), args.measure)
        return
    if not args.report:
        cache: dict = {}

        def run_one(method, dimension, lr, seed):
            if not cache:
                cache.update(tasks(args))
            return run(method, dimension, lr, seed, args, cache)

        said_study.train_all(args, path, plan(args), run_one)
    said_study.report(args, path)


if __name__ == "__main__":
    main()
