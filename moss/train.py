"""``moss train``: adapters only, on a built-in tiny Chameleon by default.

Distributed: ``torchrun --nproc_per_node N -m moss train ...`` (and torchrun's multi-node
flags) trains with DDP, the backbone frozen. ``--batch-size`` is the global batch of a
micro-step: each rank takes every N-th example of it, so the global batch, the data order and
(through ``num_items_in_batch``, the global count of target tokens) the loss are those of a
single-process run, whatever N. Rank 0 logs, shows the progress bar and writes checkpoints;
since they hold full (replicated) tensors, a run resumes on any number of processes.

Training: AdamW over the adapter parameters, linear warm-up then cosine decay, gradient
accumulation, gradient-norm clipping, bf16 autocast on a GPU, optional gradient
checkpointing (``--gradient-checkpointing``, per decoder layer), a progress bar with the loss, one
JSON line per step in ``<out>/train.log``. Checkpoints go to ``<out>/checkpoint-<step>/``
(adapter files + trainer state: optimizer, schedule, step, RNG; moss/checkpoint.py writes them
so that a crash leaves the previous one whole); ``--resume`` continues from the latest one and
ends where an uninterrupted run ends (the data order is a function of the seed and the step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from moss_kernels.backends import BACKENDS, resolve

from . import backbones, checkpoint
from .config import MossConfig
from .data import collate, load_jsonl
from .errors import input_errors
from .model import MossModel, get_moss_model
from .variants import VARIANTS

SAMPLE = Path(__file__).parent / "samples" / "interleaved.jsonl"


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, micro: int, accum: int, batch: int, n: int, seed: int) -> list[int]:
    """Examples of one micro-batch: epochs are seeded permutations, so the order depends only
    on (seed, step), and a resumed run sees exactly what an uninterrupted one would."""
    first = (step * accum + micro) * batch
    out = []
    for k in range(first, first + batch):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def _targets(example) -> int:
    """Target tokens of one example as the causal-LM loss counts them (labels shifted by one)."""
    return sum(1 for label in example.labels[1:] if label != -100)


def _distributed(gpu: bool):
    """``(rank, world, local_rank)``, initialising torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if gpu:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def _check_replicas(moss, world: int) -> None:
    """Adapters must be bitwise identical on every rank after training (DDP's promise)."""
    import torch.distributed as dist

    sums = torch.stack([p.detach().double().sum() for p in moss.parameters() if p.requires_grad])
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("adapter weights differ between ranks after training")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Chameleon checkpoint (default: built-in tiny)")
    p.add_argument("--data", type=Path, default=SAMPLE,
                   help="JSONL records (default: shipped sample)")
    p.add_argument("--out", type=Path, default=Path("moss-run"),
                   help="run folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--kernel-size", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="LoRA dropout on the adapters' input (the base layer sees it whole)")
    p.add_argument("--variant", choices=VARIANTS, default="conv")
    p.add_argument("--no-image-loss", action="store_true", help="learn text tokens only")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="moss_kernels backend (default: fastest)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the frozen backbone with FSDP2 instead of DDP")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward instead of keeping its "
                        "activations (less memory, about one more forward of time)")


def train(args: argparse.Namespace) -> Path:
    """Returns the folder of the final checkpoint."""
    for name in ("steps", "batch_size", "grad_accum", "save_every", "rank", "kernel_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"moss train: --{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit(f"moss train: --warmup must be >= 0, got {args.warmup}")
    for name in ("lr", "alpha", "max_grad_norm"):  # NaN passes a plain "> 0"
        if not 0 < getattr(args, name) < math.inf:
            raise SystemExit(f"moss train: --{name.replace('_', '-')} must be a finite number "
                             f"> 0, got {getattr(args, name)}")
    gpu = torch.cuda.is_available()
    rank, world, local = _distributed(gpu)
    if args.batch_size % world:
        raise SystemExit(f"moss train: --batch-size ({args.batch_size}, the global batch of a "
                         f"micro-step) must be a multiple of the {world} processes")
    torch.manual_seed(args.seed)
    image_loss = not args.no_image_loss
    with input_errors("train"):
        if args.backend is not None:
            resolve(args.backend, "cuda" if gpu else "cpu")
        model, vocab, _ = backbones.load(args.model)
        cfg = MossConfig(r_text=args.rank, r_image=args.rank, alpha_text=args.alpha,
                         alpha_image=args.alpha, kernel_size=args.kernel_size,
                         dropout=args.dropout,
                         image_adapter=args.variant, backend=args.backend,
                         image_grid=None if vocab.sized else vocab.grid)
        examples = load_jsonl(args.data, vocab, include_image_loss=image_loss)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(world)
    start, state = 0, None
    with input_errors("train --resume"):
        latest = checkpoint.latest_checkpoint(out) if args.resume else None
        if latest is not None:
            moss = MossModel.from_pretrained(model, latest, image_logits=image_loss)
            state = checkpoint.load_trainer_state(latest)
            start = state["step"]
    if latest is None:
        moss = get_moss_model(model, cfg, image_logits=image_loss)
    if args.gradient_checkpointing:
        # Non-reentrant: it needs no input that requires grad and replays dropout's RNG; the
        # recomputed layers find their routing by themselves (moss/router.py).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    device = torch.device(f"cuda:{local}" if gpu else "cpu")
    moss.to(device)
    runner = moss
    if world > 1 and args.fsdp:
        # FSDP2 shards the frozen backbone (and the adapters with it) layer by layer; each
        # layer's parameters are gathered for its forward and backward, so the kernels and
        # the routing plan see plain tensors.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))  # FSDP's default, but ours to release
        _MESHES.append(mesh)
        for layer in moss.backbone.decoder_layers(moss.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(moss, mesh=mesh)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(moss, device_ids=[local] if gpu else None)
    params = [p for p in moss.parameters() if p.requires_grad]  # after sharding: its params
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, args.steps, args.warmup))
    if state is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(moss, opt, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(state["scheduler"])
        torch.random.set_rng_state(state["rng"])

    from contextlib import nullcontext

    from tqdm import tqdm

    moss.train()
    log = open(out / "train.log", "a", encoding="utf-8") if rank == 0 else None
    with tqdm(total=args.steps, initial=start, desc="train", file=sys.stderr,
              disable=None if rank == 0 else True) as bar:
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            micro_batches = [batch_indices(step, m, args.grad_accum, args.batch_size,
                                           len(examples), args.seed)
                             for m in range(args.grad_accum)]
            # Normalise by the step's global target count: every rank and micro-step then adds
            # its share of one global mean, as a single process would compute it.
            n_items = torch.tensor(sum(_targets(examples[i]) for idx in micro_batches for i in idx),
                                   device=device)
            step_loss = torch.zeros((), device=device)
            for micro, idx in enumerate(micro_batches):
                mine = [examples[i] for i in idx[rank::world]]
                batch = {k: v.to(device) for k, v in collate(mine, vocab.pad).items()}
                sync = world == 1 or args.fsdp or micro == args.grad_accum - 1
                with (nullcontext() if sync else runner.no_sync()), \
                        torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                    # No KV cache in training (and transformers warns that checkpointing
                    # turns it off when asked for one).
                    loss = runner(**batch, num_items_in_batch=n_items, use_cache=False).loss
                # DDP / FSDP average the ranks' gradients; we want the sum.
                (loss * world).backward()
                step_loss += loss.detach()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(step_loss)
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss.item():.4f}")
            if log is not None:
                log.write(json.dumps({"step": step + 1, "loss": step_loss.item(),
                                      "lr": sched.get_last_lr()[0], "grad_norm": float(norm),
                                      "seconds": time.perf_counter() - t0}) + "\n")
                log.flush()
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                save_checkpoint(moss, opt, sched, step + 1, out, rank)
                _barrier(world)
    if log is not None:
        log.close()
    if world > 1 and not args.fsdp:
        _check_replicas(moss, world)
    return checkpoint.latest_checkpoint(out)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def save_checkpoint(moss, opt, sched, step: int, out: Path, rank: int = 0) -> Path:
    """Every rank gathers full tensors (collectives under FSDP2); rank 0 writes them. The
    optimizer state is keyed by parameter name, so any world size can resume from it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    adapter = moss.adapter_state_dict()
    optimizer = get_optimizer_state_dict(moss, opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return out / f"checkpoint-{step}"
    state = {"step": step, "optimizer": optimizer, "scheduler": sched.state_dict(),
             "rng": torch.random.get_rng_state()}
    return checkpoint.save_run_checkpoint(out, step, lambda folder: moss.save_pretrained(
        folder, adapter), state)


#: Device meshes ``train`` built (FSDP); ``_process_group`` releases them with the group.
_MESHES: list = []


@contextmanager
def _process_group():
    """Under torchrun: destroys the process group ``train`` creates, and drops every reference
    to it, before the interpreter shuts down; on errors too (the exit status stays the
    command's). gloo joins its worker threads only when its last reference goes
    (``destroy_process_group`` does not stop them); a worker still running at interpreter
    shutdown can abort the process (docs/design.md section 8)."""
    import gc

    import torch.distributed as dist

    ours = dist.is_available() and not dist.is_initialized()
    try:
        yield
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()
            gc.collect()  # the DDP / FSDP wrappers of the run (reference cycles) hold it too
        while _MESHES:  # DTensor's caches keep a mesh alive, and a mesh keeps its groups
            getattr(_MESHES.pop(), "_pg_registry", {}).clear()


def main(args: argparse.Namespace) -> int:
    with _process_group():
        final = train(args)
    if os.environ.get("RANK", "0") == "0":
        print(f"saved {final}")
    return 0
