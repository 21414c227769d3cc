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
already trained on; :class:`ResumableTrainOrder` keeps that position in Lightning's checkpoints.
"""
from typing import Dict, Iterator, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ['VirtualDeviceSampler', 'ResumableTrainOrder', 'TrainDataLoader']


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


class ResumableTrainOrder:
    """DataModule mixin: the training position travels in checkpoints, and a resumed run's first
    training batch is the one after the last batch trained on.

    The position (epoch, batches done) comes from the trainer's progress counters, not from the
    loader's iterator, which runs ahead of the batch being trained on. It is saved as DataModule
    state, not as the loader's: Lightning builds and starts iterating the training loader before it
    restores loop states whenever ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches``
    (every step-based schedule does), so a loader's ``load_state_dict`` comes after the first batches
    are already drawn. DataModule state is restored with the model, before that, except under
    strategies that restore after setup (FSDP, DeepSpeed): then the loader already built is dropped
    so that Lightning builds it again from the restored position.

    Subclasses pass every training sampler through :meth:`resume_sampler`.
    """

    _resume_at: Optional[Tuple[int, int]] = None

    def train_position(self) -> Optional[Tuple[int, int]]:
        """(epoch, batches done in it) of the run in progress; None outside ``fit``."""
        trainer = getattr(self, 'trainer', None)
        if trainer is None or trainer.state.fn != 'fit':
            return None
        epoch = trainer.current_epoch
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            return epoch + 1, 0
        return epoch, done

    def state_dict(self) -> Dict[str, int]:
        position = self.train_position()
        if position is None:
            return {}
        return {'train_epoch': int(position[0]), 'train_batches_done': int(position[1])}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if 'train_epoch' not in state:
            return
        self._resume_at = (int(state['train_epoch']), int(state['train_batches_done']))
        trainer = getattr(self, 'trainer', None)
        fit_loop = getattr(trainer, 'fit_loop', None)
        if getattr(fit_loop, '_combined_loader', None) is not None:  # restored after the loader was built
            fit_loop._combined_loader = None

    def resume_sampler(self, sampler: VirtualDeviceSampler) -> VirtualDeviceSampler:
        """``sampler``, told to start at the restored position if this loader is the first after a resume."""
        if self._resume_at is not None:
            sampler.skip_to(*self._resume_at)
            self._resume_at = None
        return sampler


class TrainDataLoader(DataLoader):
    """The training loader of a :class:`ResumableTrainOrder` DataModule.

    Its state is empty because the DataModule restores the position; it only tells Lightning that
    this loader resumes mid-epoch (Lightning warns about loaders without ``state_dict``).
    """

    def state_dict(self) -> Dict[str, int]:
        return {}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        pass
