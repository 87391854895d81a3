"""PA-aware fine-tuning under torch.distributed DistributedDataParallel: two processes on this
machine (gloo, torch.multiprocessing.spawn, a file:// rendezvous in tmp_path) train a prepared
module for a few steps, each on its half of the batch.

Checked: both ranks hold identical parameters and buffers afterwards, though they were prepared
on different calibration images (DDP broadcasts rank 0's parameters and buffers when it wraps the
module, and averages the gradients, so the same update is applied everywhere); rank 0's export
equals bit for bit the single-process export of the same parameters; and the DDP run equals one
process training on the whole batch up to float rounding (the average of the two half-batch mean
gradients is the whole-batch mean gradient, summed in another order)."""
import copy
import datetime
import os
import pickle
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as distributed  # noqa: E402
import torch.multiprocessing as multiprocessing  # noqa: E402

from pabnn.converters.torch import export, prepare  # noqa: E402
from pabnn.engine import load_graph  # noqa: E402

WORLD_SIZE = 2
STEPS = 3
RENDEZVOUS_SECONDS = 60  # the gloo collectives' time limit: a rank that waits longer fails, never hangs
TEST_SECONDS = 120  # the parent's limit on the two processes together
# SGD steps are linear in the gradient, so the DDP run and the single-process run differ by the
# rounding of the gradient sums (float32, about 1e-7 relative) times the rate: far below this.
TRAINING_ATOL = 1e-5


class TinyNet(torch.nn.Module):
    """Conv-ReLU, two 3x3 convs and a Linear: the default policy binarizes the two inner convs."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 4))

    def forward(self, x):
        return self.layers(x)


def _data():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(48, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=16)
    return images, labels


def _prepared(calibration_rows=slice(0, 32)):
    torch.manual_seed(0)
    images, _ = _data()
    return prepare(TinyNet().eval(), calibration=images[calibration_rows], example_input=torch.from_numpy(images[:1]),
                   weight_bases=2, act_bases=2, method="sequential", progress=False)


def _train(model, images, labels):
    """STEPS of SGD with momentum on cross-entropy; model may be the DDP wrapper."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _state(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _train_and_save(rank, prepared, folder):
    """Rank's half of the training under DDP; saves its parameters (and rank 0 the export). The DDP
    wrapper, which holds the process group, is freed when this returns."""
    model = torch.nn.parallel.DistributedDataParallel(prepared)
    images, labels = _data()
    half = len(labels) // WORLD_SIZE
    rows = slice(rank * half, (rank + 1) * half)
    _train(model, images[32:][rows], labels[rows])
    torch.save(_state(prepared), os.path.join(folder, f"rank{rank}.pt"))
    if rank == 0:
        export(model).save(os.path.join(folder, "ddp.pab"))  # export unwraps the DDP module


def _worker(rank, pickled, rendezvous, folder):
    torch.set_num_threads(1)
    prepared = pickle.loads(pickled[rank])
    distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD_SIZE,
                                   timeout=datetime.timedelta(seconds=RENDEZVOUS_SECONDS))
    try:
        _train_and_save(rank, prepared, folder)
        distributed.barrier()
    finally:
        distributed.destroy_process_group()
    # Everything this rank checks is on disk. A spawned process would now finalize the interpreter
    # and run torch's C++ destructors, which once aborted a rank here ("terminate called without an
    # active exception") after its work was done; a failure before this line still fails the test.
    os._exit(0)


@pytest.mark.slow
def test_ddp_ranks_agree_and_export_like_one_process(tmp_path):
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    # Each rank prepares its own module, as a script run by torchrun does; rank 1 calibrates on
    # other images, so its parameters start different and DDP must broadcast rank 0's. Passed as
    # pickled bytes: tensors given to torch.multiprocessing.spawn itself would be put in memory
    # shared by both ranks.
    initial, other = _prepared(), _prepared(slice(16, 48))
    assert any(not torch.equal(tensor, other.state_dict()[name]) for name, tensor in initial.state_dict().items())
    pickled = [pickle.dumps(initial), pickle.dumps(other)]
    context = multiprocessing.spawn(_worker, args=(pickled, rendezvous, str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TEST_SECONDS
    try:
        while not context.join(timeout=1):  # raises if a process failed
            assert time.monotonic() < deadline, f"the {WORLD_SIZE} DDP processes hung for {TEST_SECONDS} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()

    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    moved = [name for name, tensor in initial.state_dict().items() if not torch.equal(tensor, states[0][name])]
    assert any("weight" in name for name in moved), "training moved no weight: the comparisons would be empty"
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), f"{name} differs between the ranks"

    single = copy.deepcopy(initial)
    single.load_state_dict(states[0])
    expected = export(single).graph
    ddp = load_graph(tmp_path / "ddp.pab")
    assert [node.name for node in ddp.nodes] == [node.name for node in expected.nodes]
    for mine, theirs in zip(ddp.nodes, expected.nodes):
        assert sorted(mine.params) == sorted(theirs.params), mine.name
        for key, value in mine.params.items():
            np.testing.assert_array_equal(value, theirs.params[key], err_msg=f"{mine.name} {key}")

    whole = copy.deepcopy(initial)
    images, labels = _data()
    _train(whole, images[32:], labels)
    for name, tensor in whole.state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), states[0][name].numpy(), rtol=0, atol=TRAINING_ATOL,
                                   err_msg=f"{name}: DDP on two half batches vs one process on the whole batch")
