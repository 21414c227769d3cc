"""Training samplers: the data side of device emulation, and exact mid-epoch resume.

:class:`VirtualDeviceSampler` is the sampler of one process that stands in for one or more ranks
of a distributed run. It reuses torch's ``DistributedSampler`` order (shuffled with
``seed + epoch``), so every rank it stands in for draws exactly the indices that rank would draw
in a real DDP run. Each batch of ``len(ranks) * batch_size`` indices is rank ``ranks[0]``'s next
``batch_size`` indices, then ``ranks[1]``'s, and so on: chunk k of the batch is virtual device k.
With a single rank it is a plain ``DistributedSampler`` that drops the last incomplete batch.

It yields ``(index, epoch)`` keys, so a dataset can seed its augmentation from them (see
:class:`lightning_modules.datasets.ImageFolderDataset`): augmentation is then a function of the
seed, the epoch and the image, whatever the worker layout or a restart.

For resume, :meth:`skip_to` makes the next iteration of a given epoch start after the batches
already trained on; :class:`ResumableDataLoader` exposes that position to Lightning's checkpoints.
"""
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ['VirtualDeviceSampler', 'ResumableDataLoader']


class VirtualDeviceSampler(DistributedSampler):
    """``(index, epoch)`` keys for ranks ``ranks`` of ``num_replicas``, batch by batch, device by device.

    Subclassing ``DistributedSampler`` also tells Lightning not to inject one of its own.
    """

    def __init__(
            self,
            dataset: Dataset,
            batch_size: int,
            num_replicas: int = 1,
            ranks: Sequence[int] = (0,),
            shuffle: bool = True,
            seed: int = 0,
    ):
        ranks = tuple(ranks)
        if not ranks or any(not 0 <= r < num_replicas for r in ranks):
            raise ValueError(f'ranks {ranks} must be in [0, {num_replicas})')
        super().__init__(dataset, num_replicas=num_replicas, rank=ranks[0], shuffle=shuffle, seed=seed, drop_last=False)
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.batch_size = batch_size
        self.ranks = ranks
        self.batches_per_epoch = self.num_samples // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f'{len(dataset)} samples over {num_replicas} devices give fewer than batch_size={batch_size} per device')
        self._skip: Optional[Tuple[int, int]] = None  # (epoch, batches to skip)

    def _rank_indices(self, rank: int) -> list:
        own_rank = self.rank
        self.rank = rank
        try:
            return list(super().__iter__())
        finally:
            self.rank = own_rank

    def skip_to(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration of ``epoch`` (only) start at batch ``batches_done``."""
        self.set_epoch(epoch)
        self._skip = (epoch, batches_done)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None
        per_rank = [self._rank_indices(r) for r in self.ranks]
        bs, epoch = self.batch_size, self.epoch
        for step in range(start, self.batches_per_epoch):
            for indices in per_rank:
                for i in indices[step * bs:(step + 1) * bs]:
                    yield i, epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size * len(self.ranks)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose ``state_dict`` is the training position (epoch, batches done).

    The position comes from ``position_fn`` (the trainer's progress counters), not from the
    iterator, which Lightning prefetches ahead of the batch being trained on. Lightning saves it
    in checkpoints and, on resume, loads it before iterating, so the sampler skips exactly the
    batches already trained on (without loading them).
    """

    position_fn: Optional[Callable[[], Tuple[int, int]]] = None

    def state_dict(self) -> Dict[str, int]:
        if self.position_fn is None:
            return {}
        epoch, batches_done = self.position_fn()
        return {'epoch': int(epoch), 'batches_done': int(batches_done)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state and isinstance(self.sampler, VirtualDeviceSampler):
            self.sampler.skip_to(state['epoch'], state['batches_done'])
