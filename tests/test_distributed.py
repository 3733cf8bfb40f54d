"""Several processes (torch.distributed, gloo on the CPU) recover as one process would.

Each test starts two processes with ``torch.multiprocessing`` (forked from a server that has done the imports);
they meet through a file store in ``tmp_path``, run, and leave what they computed in ``tmp_path`` for the test
process to compare with a run of its own.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regrow
from regrow import distributed

WORLD = 2
BATCH = 16  # the global batch: 8 samples on each of the two ranks
# The ranks are forked from a server process that has imported torch and regrow once for all the tests (and
# torch._dynamo, which an optimizer imports on first use), rather than spawned as fresh interpreters that each
# spend seconds on those imports: nothing but the imports ran in that process, so each rank starts as a fresh one.
# Where there is no fork (Windows), they are spawned.
START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
if START == "forkserver":
    mp.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "regrow", __name__])


def _data(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 12, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train = DataLoader(
        TensorDataset(x[:64], y[:64]), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=BATCH)
    return train, val


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(3, 3)  # never called: DDP must allow a parameter without a gradient
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Net()


def _recover(model: nn.Module, masks: regrow.MaskSet, train, val, **extra) -> regrow.RecoveryResult:
    settings = {
        "method": "finetune",
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "epochs": 4,
        "patience": None,
        "warmup": 0.0,
        "progress": False,
    }
    return regrow.recover(model, masks, train, val, **(settings | extra))


class _LastStep:
    """Keeps the weights after the last training step (the model handed back is the best epoch's)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, state) -> None:
        pass

    def on_step_end(self, state) -> None:
        self.weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def checkpoint_ready(self, state) -> bool:
        return True


def _prune_and_recover(
    criterion: str, as_list: bool, **extra: object
) -> tuple[nn.Module, regrow.MaskSet, regrow.RecoveryResult]:
    train, val = _data()
    if as_list:  # any iterable of batches, not a DataLoader: read whole on every rank and sliced
        train, val = [b for b in train], [b for b in val]
    model = _model()
    data = distributed.shard(train)  # as regrow.run does: Taylor averages the ranks' gradients of each batch
    masks = regrow.prune(model, 0.6, criterion=criterion, data=data, keep_dense=False, ignore="unused.*")
    # (taylor: each batch's gradient averaged over the ranks; wanda / sparsegpt: input statistics summed over them)
    torch.manual_seed(2)
    last = _LastStep()
    extra = dict(extra)
    result = _recover(model, masks, train, val, callbacks=[last, *extra.pop("callbacks", [])], **extra)
    result.details["last_step"] = last.weights
    return model, masks, result


def _worker(rank: int, store: str, out: str, criterion: str, as_list: bool, extra: dict | None = None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    group = dist.group.WORLD
    try:
        model, masks, result = _prune_and_recover(criterion, as_list, **(extra or {}))
    finally:
        dist.destroy_process_group()
    gc.collect()
    torch.save(
        {
            "weights": model.state_dict(),
            "masks": dict(masks.items()),
            "history": [(h.val_accuracy, h.val_loss, h.train_loss) for h in result.history],
            "best": result.best_epoch,
            "last_step": result.details["last_step"],
            "stop_reason": result.stop_reason,
            "rollbacks": [(r["epoch"], r["step"]) for r in result.details["guard"]["rollbacks"]],
            # references to the group left once it is destroyed: `group` and getrefcount's own argument
            "group_refs": sys.getrefcount(group),
        },
        f"{out}/rank{rank}.pt",
    )


@pytest.mark.parametrize(
    ("criterion", "as_list"), [("magnitude", False), ("taylor", True), ("wanda", False), ("sparsegpt", True)]
)
def test_two_processes_at_half_the_batch_train_as_one_process(tmp_path: Path, criterion: str, as_list: bool):
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path), criterion, as_list),
        nprocs=WORLD,
        start_method=START,
    )
    torch.set_num_threads(1)
    model, masks, result = _prune_and_recover(criterion, as_list)  # one process, the whole batch
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for got in ranks:
        # destroyed means gone, worker threads joined: a group that outlives it (DDP's first wrap importing
        # torch.distributed.nn.functional, whose defaults hold the group) can abort the process at its exit
        assert got["group_refs"] == 2, "destroy_process_group() left the process group alive"
        assert sorted(got["masks"]) == sorted(masks)
        for fqn, mask in masks.items():
            assert torch.equal(got["masks"][fqn], mask), fqn  # identical masks
            assert torch.count_nonzero(got["weights"][fqn][~mask]) == 0  # pruned weights exactly zero
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got["weights"][name], value, atol=1e-5, rtol=0)  # the kept epoch's
            torch.testing.assert_close(got["last_step"][name], result.details["last_step"][name], atol=1e-5, rtol=0)
            if name in masks:
                assert torch.count_nonzero(got["last_step"][name][~masks[name]]) == 0
        assert got["best"] == result.best_epoch
        for (acc, loss, train_loss), h in zip(got["history"], result.history, strict=True):
            assert acc == pytest.approx(h.val_accuracy, abs=1e-9)  # metrics summed over the ranks
            assert loss == pytest.approx(h.val_loss, rel=1e-5)
            assert (train_loss is None) == (h.train_loss is None)
            if train_loss is not None:
                assert train_loss == pytest.approx(h.train_loss, rel=1e-5)
    assert torch.equal(ranks[0]["weights"]["body.2.weight"], ranks[1]["weights"]["body.2.weight"])


@pytest.mark.parametrize(
    "extra",
    [
        {"stop_when": {"seconds": 1e-6}},  # each rank's own clock is over budget: rank 0's decision stops both
        {"lr": 8.0, "guard": {"retries": 3}},  # diverges twice: rolled back with a lower rate, on every rank alike
        {"callbacks": [regrow.GradualPruning(final=0.8, every=2, end=0.5)]},  # masks moved during training
    ],
    ids=["time-budget", "guard-rollback", "gradual"],
)
def test_ranks_take_the_decisions_one_process_takes(tmp_path: Path, extra: dict):
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path), "magnitude", False, extra),
        nprocs=WORLD,
        start_method=START,
    )
    torch.set_num_threads(1)
    model, masks, result = _prune_and_recover("magnitude", False, **extra)
    if "callbacks" in extra:
        assert masks.sparsity() == pytest.approx(0.8, abs=1e-3)  # the ramp reached its end
    rollbacks = [(r["epoch"], r["step"]) for r in result.details["guard"]["rollbacks"]]
    if "guard" in extra:
        assert rollbacks, "the learning rate was meant to make recovery diverge"
    # a learning rate that diverges amplifies the rounding differences of summing over two ranks: 1e-3 there
    atol = 1e-3 if "guard" in extra else 1e-5
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for got in ranks:
        assert all(torch.equal(got["masks"][f], m) for f, m in masks.items())
        assert got["stop_reason"] == result.stop_reason and got["rollbacks"] == rollbacks
        assert len(got["history"]) == len(result.history)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got["weights"][name], value, atol=atol, rtol=0)
            assert torch.equal(got["weights"][name], ranks[0]["weights"][name])  # the ranks stay identical


def test_one_process_is_not_distributed():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world() == 1
    data = [(torch.zeros(4, 2), torch.zeros(4))]
    assert distributed.shard(data) is data and distributed.whole(data) is data
    assert distributed.all_sum([1.0, 2.0]) == [1.0, 2.0]


def test_a_batch_is_split_by_stride(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    batches = [(torch.arange(6), {"mask": torch.arange(6) * 10}), (torch.arange(1), torch.arange(1))]
    sharded = distributed.Sharded(batches)
    got = list(sharded)
    assert len(got) == 1  # the one-sample batch is skipped by every rank
    assert got[0][0].tolist() == [1, 3, 5] and got[0][1]["mask"].tolist() == [10, 30, 50]
    assert len(sharded) == 1 and distributed.whole(sharded) is batches  # the batches every rank trains on


def test_the_batch_count_leaves_out_batches_too_small_to_split(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    data = TensorDataset(torch.arange(33.0), torch.zeros(33))
    loader = DataLoader(data, batch_size=16)  # 16, 16 and 1: the last is skipped by both ranks
    sharded = distributed.Sharded(loader)
    assert len(sharded) == 2 == len(list(sharded))
    assert [b[0].tolist() for b in sharded][1] == [16.0 + 2 * i for i in range(8)]
    even = distributed.Sharded(DataLoader(TensorDataset(torch.arange(34.0), torch.zeros(34)), batch_size=16))
    assert len(even) == 3 == len(list(even))  # 16, 16 and 2
    assert len(distributed.Sharded(list(loader))) == 2


def test_a_loader_with_a_distributed_sampler_is_refused(monkeypatch: pytest.MonkeyPatch):
    from torch.utils.data import DistributedSampler

    monkeypatch.setattr(distributed, "world", lambda: 2)
    data = TensorDataset(torch.arange(8.0), torch.zeros(8))
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.raises(regrow.RegrowError, match="DistributedSampler"):
        distributed.Sharded(loader)


def test_a_lost_peer_is_named_in_one_paragraph(monkeypatch: pytest.MonkeyPatch):
    # what gloo raises on the surviving rank when the other one is killed (its text varies with the moment; a
    # real kill under torchrun is in tests/integration/test_torchrun.py)
    exc = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5")
    assert not distributed.lost_peer(exc)  # one process: nothing to lose
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    assert distributed.lost_peer(exc)
    assert not distributed.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    message = distributed.lost_peer_message(exc, True)
    assert message.startswith("rank 0 of 2 lost contact with another process of this job ([../third_party/gloo")
    assert "--resume" in message and "\n" not in message
    assert "--resume" not in distributed.lost_peer_message(exc, None)


def test_an_fsdp2_sharded_model_is_refused_with_what_to_do(tmp_path: Path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        masks = regrow.MaskSet({"0.weight": torch.ones(4, 4, dtype=torch.bool)})
        with pytest.raises(regrow.RegrowError, match=r"'0.weight' is a DTensor .* docs/scale.md"):
            masks.apply(model)
    finally:
        dist.destroy_process_group()
