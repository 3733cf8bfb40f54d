"""Recovery on several processes: ``torch.distributed`` data parallelism (DDP), as one process would train.

regrow is distributed when a default process group with more than one process exists: ``torchrun
--nproc-per-node N -m regrow run RECIPE`` makes one (gloo on CPUs, NCCL on GPUs, one GPU per process), and a
program of the user's own that has called ``torch.distributed.init_process_group`` may call ``regrow.run`` or
``regrow.recover`` on every rank. Then:

* **data**: every global batch of the single-process run is split across the ranks (:class:`Sharded`): rank
  ``r`` of ``N`` gets its samples ``r, r + N, ...``. A DataLoader over a map-style dataset loads only those
  (the index lists are rank 0's, sent to all, so every rank agrees on the shuffle); any other iterable of
  batches is read whole on every rank and sliced. A global batch with fewer samples than ranks is skipped by
  all of them. With the loss a mean over the batch, DDP's average of the ranks' gradients is the gradient of
  the global batch: 2 processes at batch B/2 train as 1 process at batch B (a batch that does not split evenly
  weighs its shards equally, a small difference from one process).
* **model**: trained through ``DistributedDataParallel`` (the dense teacher is never wrapped). DDP copies rank
  0's weights to every rank when it starts; the masks are rank 0's too (:func:`broadcast_masks`), so every
  rank prunes and keeps the same weights.
* **metrics**: validation and test metrics, training sums and the divergence guard's loss are summed over the
  ranks, so every rank takes the same decisions (kept epoch, early stop, rollback); the stop reason is rank 0's.
* **scores**: Taylor scores average each batch's gradient over the ranks before they are summed, as one process
  would see the global batch; calibrated criteria (wanda, sparsegpt) sum each layer's input statistics over
  the ranks; sensitivity reads all of its data on every rank (the same curves, the same work on each).
* **files**: only rank 0 writes (:mod:`regrow.pipeline`); the other ranks write into a private temporary
  folder that is deleted, and a resumed run copies rank 0's checkpoint before it reads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regrow.errors import RegrowError


def _import_group_defaults() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists yet.

    Its functions take ``group=group.WORLD`` as a default argument, read once, when the module is first imported,
    and ``DistributedDataParallel`` imports it (through ``torch.distributed.fsdp``) the first time it wraps a
    model. Imported after the default group was made, those defaults hold the group for the rest of the process:
    ``destroy_process_group()`` then leaves it alive with its worker threads, and a worker that drops the last
    reference to a collective's tensor while Python shuts down aborts the process ("terminate called without an
    active exception", SIGABRT) after a run that finished. Imported with regrow, before any group, the defaults
    are None and destroying the group joins its threads."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        import torch.distributed.nn.functional  # noqa: F401 - for the side effect above


_import_group_defaults()


def active() -> bool:
    """Whether a default process group with more than one process exists."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a run on one process: the one that writes files and shows progress."""
    return rank() == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group a launcher described in the environment (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...): gloo for CPU tensors, and NCCL for CUDA tensors where there is a GPU
    (this process's: ``LOCAL_RANK``); True when this call made the group."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


def local_device(device: str) -> str:
    """``device`` for this rank: on CUDA, the GPU of its local rank (one GPU per process)."""
    if active() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank()))}"
    return device


def _collective_device(tensor_device: torch.device | str) -> torch.device:
    """Where a tensor must be for the group's backend: the CPU for gloo, the GPU for NCCL alone, else its own."""
    import torch.distributed as dist

    backend = dist.get_backend()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(tensor_device)


def all_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed over the ranks (float64), or as they are on one process."""
    if not active():
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device("cpu"))
    dist.all_reduce(t)
    return t.tolist()


def mean(value: Tensor) -> Tensor:
    """A scalar tensor averaged over the ranks (no host sync on a GPU), or as it is on one process."""
    if not active():
        return value
    import torch.distributed as dist

    where = _collective_device(value.device)
    t = value.detach().to(where, torch.float64).reshape(1).clone()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).to(value.device, value.dtype).reshape(value.shape)


def sum_(tensors: Iterable[Tensor | None], *, average: bool = False) -> None:
    """Sum (or average) tensors over the ranks in place (None entries skipped)."""
    if not active():
        return
    import torch.distributed as dist

    n = dist.get_world_size()
    for t in tensors:
        if t is None:
            continue
        where = _collective_device(t.device)
        buf = t if t.device == where else t.to(where)
        dist.all_reduce(buf)
        if average:
            buf.div_(n)
        if buf is not t:
            t.copy_(buf)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects: a stop reason, a path, index lists)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (on one process: ``ok``): a refusal that one rank finds is then made by
    all of them, instead of leaving the others waiting in the next collective."""
    return all_sum([0.0 if ok else 1.0])[0] == 0.0


def per_rank(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable; tensors on the CPU), in rank order, on every rank; None on one process."""
    if not active():
        return None
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mine(values: list[Any] | None, default: Any) -> Any:
    """This rank's entry of :func:`per_rank`'s list, or ``default`` (one process, or a list from another number
    of processes: a checkpoint resumed on fewer or more ranks than wrote it)."""
    if values is None or not active() or len(values) != world():
        return default
    return values[rank()]


@torch.no_grad()
def broadcast_masks(masks: dict[str, Tensor]) -> None:
    """Make every rank's masks rank 0's, in place (the names must agree: the same model on every rank)."""
    if not active():
        return
    import torch.distributed as dist

    names = broadcast_object(sorted(masks))
    if not all_agree(names == sorted(masks)):
        raise RegrowError(
            "the ranks hold masks for different parameters; every rank must prune the same model with the same recipe."
        )
    for fqn in names:
        mask = masks[fqn]
        where = _collective_device(mask.device)
        buf = mask.to(where, torch.uint8)
        dist.broadcast(buf, src=0)
        mask.copy_(buf.to(mask.device, torch.bool))


@torch.no_grad()
def broadcast_model(model: nn.Module, masks: dict[str, Tensor] | None = None) -> None:
    """Make every rank's weights and buffers (and ``masks``) rank 0's, in place: after pruning, so that every rank
    goes on from the same pruned model. A model whose shapes differ from rank 0's is refused."""
    if not active():
        return
    import torch.distributed as dist

    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if not all_agree(broadcast_object(shapes) == shapes):
        raise RegrowError(
            "the ranks' pruned models have different shapes: structural pruning chose other channels or heads on "
            "some rank. Every rank must prune the same model with the same recipe and data."
        )
    for value in state.values():
        where = _collective_device(value.device)
        own = value.detach()
        buf = own if own.device == where else own.to(where)
        dist.broadcast(buf, src=0)
        if buf is not own:  # sent through another device: back into the model's own tensor
            own.copy_(buf)
    if masks is not None:
        broadcast_masks(masks)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (which copies rank 0's weights and buffers to every rank), or
    the model itself on one process. ``static_graph``: every step uses the same parameters, so DDP finds those
    a step leaves without a gradient (a Hugging Face encoder's unused pooler) in the first step, and does not
    search the autograd graph again in every step as ``find_unused_parameters`` would."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, static_graph=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (its parameter names have no ``module.``)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure because another process of the group is gone."""
    if not active():
        return False
    text = str(exc).lower()
    signs = ("connection closed", "connection reset", "broken pipe", "timed out", "socket", "communicator was aborted")
    return any(s in text for s in signs)


def lost_peer_message(exc: BaseException, resumable: Any) -> str:
    """One paragraph for a rank whose peer is gone."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (
        f"rank {rank()} of {world()} lost contact with another process of this job ({first}); a process was killed "
        "or failed (its own message, or the launcher's, says which and why), so the job stops. Rank 0 publishes "
        "nothing from an unfinished run: the output folder is left as it was"
        + (
            ", but for the checkpoint of an interrupted run, which the same command with --resume continues."
            if resumable
            else "."
        )
    )


def leave() -> None:
    """Leave the process group this process joined (``init_from_env``); quietly, even after a failure."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - the group may be broken already; the process is ending anyway
            pass


def out_folder(
    final: Path, stage: Callable[..., AbstractContextManager[Path]], *, overwrite: bool, resume: bool = False
) -> AbstractContextManager[Path]:
    """Where this rank writes: rank 0 (or one process) the run's staging folder (``stage``, e.g.
    ``regrow.io.staged_out_dir``); any other rank a private temporary folder, deleted at the end, holding a copy
    of rank 0's checkpoint when the run resumes."""
    return _staged(final, stage, overwrite, resume) if is_main() else _private(resume)


@contextmanager
def _staged(final: Path, stage: Callable[..., AbstractContextManager[Path]], overwrite: bool, resume: bool) -> Any:
    with stage(final, overwrite=overwrite, resume=resume) as out:
        broadcast_object(str(out))  # the other ranks copy its checkpoint from there
        if not all_agree(True):
            raise RegrowError(_UNSEEN)
        yield out


@contextmanager
def _private(resume: bool) -> Any:
    from regrow.staging import CHECKPOINT

    main_stage = Path(broadcast_object(None))
    seen = not resume or (main_stage / CHECKPOINT).is_dir()
    if not all_agree(seen):
        raise RegrowError(_UNSEEN)
    with tempfile.TemporaryDirectory(prefix=f"regrow-rank{rank()}-") as tmp:
        out = Path(tmp)
        if resume:
            shutil.copytree(main_stage / CHECKPOINT, out / CHECKPOINT)
        yield out


_UNSEEN = (
    "--resume on several processes reads rank 0's checkpoint from its output folder on every rank, and some rank "
    "cannot see it: give every process the same filesystem (one machine, or a shared folder for --out)."
)


# ------------------------------------------------------------------------------------------------- data


def _slice(x: Any, r: int, n: int) -> Any:
    if isinstance(x, Tensor):
        return x[r::n]
    if isinstance(x, dict):
        return {k: _slice(v, r, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_slice(v, r, n) for v in x)
    return x


def _rows(x: Any) -> int | None:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() else None
    if isinstance(x, dict):
        return next((n for n in map(_rows, x.values()) if n is not None), None)
    if isinstance(x, (list, tuple)):
        return next((n for n in map(_rows, x) if n is not None), None)
    return None


class Sharded:
    """This rank's part of every global batch of ``whole`` (see the module docstring).

    ``len()`` is the number of global batches (the same on every rank); ``whole`` is the data every rank
    would read on one process (criteria that read all the data use it).
    """

    def __init__(self, whole: Iterable[Any]) -> None:
        from torch.utils.data import DistributedSampler

        if isinstance(getattr(whole, "sampler", None), DistributedSampler) or isinstance(
            getattr(getattr(whole, "batch_sampler", None), "sampler", None), DistributedSampler
        ):
            raise RegrowError(
                "the data's DataLoader has a DistributedSampler, which gives each rank its own samples; regrow splits "
                "every batch across the ranks itself. Pass the loader every rank would use on one process (the "
                "same dataset, batch size and shuffle on every rank)."
            )
        self.whole = whole
        self.rank, self.world = rank(), world()
        self._iterations = 0

    def __len__(self) -> int:
        """The batches every rank trains on: the global batches with at least one sample per rank."""
        from torch.utils.data import BatchSampler, DataLoader

        data = self.whole
        if isinstance(data, DataLoader):
            sampler = data.batch_sampler
            if not isinstance(sampler, BatchSampler):
                return len(data)  # a batch sampler of the user's own: batch sizes unknown ahead (rarely one is tiny)
            last = len(sampler.sampler) % sampler.batch_size  # type: ignore[arg-type]
            return len(sampler) - (0 < last < self.world and not sampler.drop_last)
        return sum(1 for batch in data if (_rows(batch) or 0) >= self.world)  # a list: no side effects

    def __iter__(self) -> Iterator[Any]:
        # The underlying iterator is made now, not at the first batch: a DataLoader draws its base seed from its
        # generator when an iterator is made, and some callers make one they never read (tqdm does), so this
        # draws exactly what iterating the DataLoader itself would.
        from torch.utils.data import DataLoader, IterableDataset

        data = self.whole
        if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
            # index lists as one process draws them: a loader over the indices with the same batch sampler and
            # generator draws what iterating ``data`` draws (its base seed, then the shuffle)
            indices = DataLoader(_Indices(len(data.dataset)), batch_sampler=data.batch_sampler, collate_fn=list)
            indices.generator = data.generator
            return self._indexed(data, iter(indices))
        return self._sliced(iter(data))

    def _sliced(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            rows = _rows(batch)
            if rows is None or rows < self.world:
                continue  # a batch with fewer samples than ranks: skipped by every rank alike
            yield _slice(batch, self.rank, self.world)

    def _indexed(self, loader: Any, indices: Iterator[list[int]]) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        shards = _Shards(indices, self.rank, self.world)
        # its own generator: no draw from the global one (one process makes none); seeded per rank and per pass, so
        # that workers' random transforms differ from rank to rank and from epoch to epoch
        self._iterations += 1
        seeded = torch.Generator().manual_seed(self._iterations * 1_000_003 + self.rank)
        workers = {"num_workers": loader.num_workers, "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory}
        if loader.num_workers:
            workers |= {
                "worker_init_fn": loader.worker_init_fn,
                "multiprocessing_context": loader.multiprocessing_context,
                "prefetch_factor": loader.prefetch_factor,
                "timeout": loader.timeout,
            }
        yield from DataLoader(loader.dataset, batch_sampler=shards, generator=seeded, **workers)


class _Shards:
    """This rank's part of each index list, batch by batch: every rank reads its own index lists (so its
    generator draws what one process draws, also in an epoch cut short) and uses rank 0's."""

    def __init__(self, indices: Iterator[list[int]], rank: int, world: int) -> None:
        self.indices, self.rank, self.world = indices, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for mine in self.indices:
            idx = broadcast_object(mine)
            if len(idx) >= self.world:
                yield idx[self.rank :: self.world]


class _Indices:
    """A dataset whose samples are their own indices."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def shard(data: Any) -> Any:
    """``data`` as :class:`Sharded` when distributed (already sharded data and None as they are)."""
    if data is None or not active() or isinstance(data, Sharded):
        return data
    return Sharded(data)


def whole(data: Any) -> Any:
    """The data one process would read: a ``Sharded``'s ``whole``, anything else as it is."""
    return data.whole if isinstance(data, Sharded) else data
