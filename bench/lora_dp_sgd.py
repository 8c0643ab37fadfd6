"""DP-SGD fine-tuning of LoRA adapters with indivgrad_cuda.privacy.DPSGD: a tiny GPT-2 built
from its config (no download), peft LoRA adapters on its attention and MLP Conv1D layers (the
base frozen: only the adapters are trained, clipped and noised), and a few DP-SGD steps on
synthetic token sequences, each sequence an arithmetic progression modulo the vocabulary
(start and stride drawn per sequence), so next-token prediction has something to learn.

    python bench/lora_dp_sgd.py [--steps 10] [--device cpu|cuda] [--sample-rate 0.05]
                                [--noise-multiplier 1.0] [--max-grad-norm 1.0] [--lr 0.05]

Each step: a Poisson batch (indivgrad_cuda.privacy.poisson_loader: each of the --dataset-size
sequences joins with probability --sample-rate), one forward and one backward through the
engine's clipped sum (no per-sample gradient in memory), Gaussian noise of std
noise_multiplier * max_grad_norm, the division by the expected batch size and an Adam step.
Prints per step the batch size, the batch's mean loss, epsilon at --delta so far (by
--accountant, default Opacus's RDP accountant; needs opacus) and the step's wall time; at the
end the median step time, epsilon by the PRV and the RDP accountants, and the mean loss of the
whole dataset before and after. Needs peft (pip install -e .[bench]). About 10 s on 2 CPU
cores with the defaults, most of it importing transformers and peft.

The per-step epsilon is RDP's by default because the PRV accountant's computation between
steps slowed the step after it on 2 CPU cores (about 30 ms a step, then about 65 ms from the
7th step on; with RDP, or with epsilon computed only at the end, it stayed at about 30 ms). The
cause is not pinned down (presumably the accountant's numerical threads against torch's).
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import console
from indivgrad_cuda.privacy import DPSGD, poisson_loader


def lm_loss(out, ids):
    """Next-token cross-entropy, the mean over the batch's tokens (every sequence has T)."""
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def synthetic_sequences(n, t, vocab, generator):
    """[n, t] token ids: start + stride * position (mod vocab), start and stride per sequence."""
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    stride = torch.randint(1, 4, (n, 1), generator=generator)
    return (start + stride * torch.arange(t)) % vocab


def lora_gpt2(args):
    import peft
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=max(1, args.width // 32),
        n_positions=args.seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 1,
    )
    base = transformers.GPT2LMHeadModel(cfg)
    # GPT-2's Conv1D stores its weight as [in, out]: fan_in_fan_out=True tells peft so
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    return peft.get_peft_model(base, lora)


@torch.no_grad()
def dataset_loss(model, ids, batch=256):
    """The mean next-token loss over every sequence (all have T tokens)."""
    total = sum(len(b) * lm_loss(model(input_ids=b), b).item() for b in ids.split(batch))
    return total / len(ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="DP-SGD steps (logical batches)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset-size", type=int, default=640)
    parser.add_argument("--sample-rate", type=float, default=0.05, help="Poisson sampling rate (32 expected)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="GPT-2's n_embd")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r (alpha 2r)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--accountant", choices=["rdp", "prv", "gdp"], default="rdp", help="for the per-step epsilon (default rdp)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    console.silence_peer_warnings()
    # peft asks transformers' deprecated is_gradient_checkpointing when it wraps the model
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    model = lora_gpt2(args).to(device).train()  # dropout 0: train mode computes what eval mode does
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2 (n_embd {args.width}, {args.layers} layers, vocabulary {args.vocab}, T {args.seq_len}) with LoRA "
        f"r={args.rank}: {sum(p.numel() for p in trainable):,} of {total:,} parameters trained, on {device}"
    )
    ids = synthetic_sequences(args.dataset_size, args.seq_len, args.vocab, torch.Generator().manual_seed(args.seed))
    loader = poisson_loader(TensorDataset(ids), args.sample_rate, steps=args.steps, seed=args.seed)
    dp = DPSGD(
        model,
        torch.optim.Adam(trainable, lr=args.lr),
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        sample_rate=args.sample_rate,
        dataset_size=args.dataset_size,
        seed=args.seed,
    )
    before = dataset_loss(model, ids.to(device))
    print(f"\n  {'step':>4} {'batch':>5} {'loss':>8} {'epsilon':>8} {'step ms':>8}   (epsilon: {args.accountant})")
    times = []
    for step, (batch,) in enumerate(loader, 1):
        batch = batch.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stats = dp.step({"input_ids": batch}, batch, lm_loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        epsilon = dp.epsilon(args.delta, args.accountant)
        print(f"  {step:>4} {len(batch):>5} {stats.loss.item():>8.4f} {epsilon:>8.3f} {times[-1]:>8.1f}")
    after = dataset_loss(model, ids.to(device))
    print(
        f"\n{args.steps} steps: median {statistics.median(times):.1f} ms a step; epsilon at delta {args.delta:g} "
        f"{dp.epsilon(args.delta, 'prv'):.3f} (PRV), {dp.epsilon(args.delta, 'rdp'):.3f} (RDP) (noise multiplier "
        f"{args.noise_multiplier:g}, sample rate {args.sample_rate:g}); dataset loss {before:.4f} -> {after:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
