"""Which dataset indices each training micro-batch was drawn from, for the NaN guard's messages.

The prepared training dataloader's batch sampler is wrapped (on the loader Accelerate built, never
on the user's objects) so that each list of indices it yields is kept as a tuple, for the few
batches drawn ahead of the loop (worker prefetching, Accelerate's one-batch look-ahead). Batches
are delivered in the order their indices were drawn, so the batch at position ``batch_idx`` of
an epoch came from the indices at the same position. The cost is one tuple of Python ints per
batch: no tensor is read, nothing runs on the device.

The indices are not known, and :attr:`SampleIndices.unknown` says why, for an ``IterableDataset``
(its samples have no index), a DataLoader without a batch sampler (``batch_size=None``),
Accelerate's ``dispatch_batches`` (the main process slices the batches) and ``in_order=False``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["SampleIndices"]

_MARGIN = 8  # batches kept beyond the look-ahead


class _RecordingBatchSampler:
    """Yields what ``inner`` yields, keeping ``(position in the epoch, indices)`` of the last ones.

    Every other attribute is ``inner``'s (Accelerate's ``set_epoch`` and safeloop's shuffle
    generator are reached through it).
    """

    def __init__(self, inner: Any, keep: int) -> None:
        self._safeloop_inner = inner
        self._safeloop_recent: deque[tuple[int, tuple[Any, ...]]] = deque(maxlen=keep)

    def __iter__(self) -> Iterator[Any]:
        recent = self._safeloop_recent
        recent.clear()  # a new epoch: positions start again at 0
        for position, indices in enumerate(self._safeloop_inner):
            recent.append((position, tuple(indices)))
            yield indices

    def __len__(self) -> int:
        return len(self._safeloop_inner)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_safeloop_"):  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._safeloop_inner, name)


class SampleIndices:
    """The dataset indices of the training micro-batches, looked up by position in the epoch.

    Args:
        loader (`Any`): the prepared training dataloader (an Accelerate ``DataLoaderShard``, or a
            plain ``DataLoader``); its batch sampler is wrapped here.

    Attributes:
        unknown (`str | None`): why the indices cannot be known, or None when they are.
        ordered (`bool`): the loader collates with torch's default ``collate_fn``, which keeps
            sample ``i`` of the batch at row ``i``; a custom one may reorder or drop samples.
    """

    def __init__(self, loader: Any) -> None:
        self.unknown: str | None = None
        self.ordered = True
        self._recorder: _RecordingBatchSampler | None = None
        base = getattr(loader, "base_dataloader", loader)  # Accelerate's wrapper holds the real one
        if isinstance(getattr(loader, "dataset", None), IterableDataset):
            self.unknown = "the dataset is an IterableDataset, whose samples have no index"
        elif type(loader).__name__ == "DataLoaderDispatcher":
            self.unknown = "Accelerate dispatches the batches from the main process (`dispatch_batches`)"
        elif not isinstance(base, DataLoader) or base.batch_sampler is None:
            self.unknown = "the DataLoader has no batch sampler (`batch_size=None`)"
        elif getattr(base, "in_order", True) is False:
            self.unknown = "the DataLoader delivers batches out of order (`in_order=False`)"
        if self.unknown is not None:
            return
        self.ordered = base.collate_fn is default_collate
        workers = max(base.num_workers, 1)
        ahead = workers * (base.prefetch_factor or 2) + 1  # workers' prefetch, Accelerate's look-ahead
        self._recorder = _RecordingBatchSampler(base.batch_sampler, ahead + _MARGIN)
        # DataLoader refuses a new batch sampler once built (for its users' sake); this loader is
        # the one Accelerate built for the run, and iterating it draws exactly as before
        object.__setattr__(base, "batch_sampler", self._recorder)

    def take(self, batch_idx: int) -> tuple[Any, ...] | None:
        """The indices of the epoch's micro-batch ``batch_idx`` (drawn, not yet forgotten), or None.

        Called for each micro-batch in order; older entries are dropped on the way.
        """
        if self._recorder is None:
            return None
        recent = self._recorder._safeloop_recent
        while recent and recent[0][0] < batch_idx:
            recent.popleft()
        if recent and recent[0][0] == batch_idx:
            return recent[0][1]
        return None
