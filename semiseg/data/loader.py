"""Training streams: resumable infinite sampling, weak crops in workers, named batches.

Every sample's randomness comes from a seed derived from (run seed, stream, rank, position in the stream), so a
resumed run draws exactly the crops an uninterrupted run would, whatever the number of workers. Each rank reads
its own disjoint share of every epoch's permutation (the DistributedSampler scheme, without padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from semiseg.data.batch import LabeledBatch, UnlabeledBatch
from semiseg.data.info import IGNORE
from semiseg.data.transforms import weak_transform

STREAM_LABELED, STREAM_UNLABELED, STREAM_MIX = 0, 1, 2


class StreamSampler(Sampler):
    """Endless (index, sample_seed) pairs: epoch after epoch of seeded permutations, this rank's share of each.

    `start` is the number of samples this rank has already consumed (resume).
    """

    def __init__(self, n: int, seed: int, stream: int, rank: int = 0, world: int = 1, start: int = 0):
        if n <= 0:
            raise ValueError("StreamSampler: empty dataset")
        self.n, self.seed, self.stream, self.rank, self.world, self.start = n, seed, stream, rank, world, start
        self.per_rank = max(n // world, 1)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.stream * 7_919 + epoch) % (2**63))
        perm = torch.randperm(self.n, generator=g)
        if self.n < self.world:
            perm = perm.repeat(self.world)
        return perm[self.rank :: self.world][: self.per_rank].tolist()

    def __iter__(self):
        pos = self.start
        while True:
            epoch, offset = divmod(pos, self.per_rank)
            for idx in self.order(epoch)[offset:]:
                yield idx, (self.seed, self.stream, self.rank, pos)
                pos += 1

    def __len__(self):  # DataLoader asks; the stream is endless
        return 2**62


@dataclass
class Part:
    """A slice of a training list: a dataset, whether its masks are pseudo-labels, how often it is repeated."""

    dataset: Dataset
    pseudo: bool = False
    repeat: int = 1


class CropSet(Dataset):
    """Weak crops of one or more datasets (ST-style lists concatenate labeled and pseudo-labeled parts).

    Items are indexed by (index, seed_key) pairs from StreamSampler and returned as dicts of tensors.
    """

    def __init__(self, parts: list[Part], crop: int, scale_range: tuple[float, float], base_size: int, labeled: bool):
        self.parts = [p for p in parts if len(p.dataset) > 0]
        self.crop, self.scale_range, self.base_size, self.labeled = crop, scale_range, base_size, labeled
        self.index: list[tuple[int, int]] = []
        for pi, p in enumerate(self.parts):
            self.index += [(pi, i) for _ in range(p.repeat) for i in range(len(p.dataset))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        idx, seed_key = key if isinstance(key, tuple) else (key, (0, 0, 0, key))
        pi, i = self.index[idx]
        part = self.parts[pi]
        sample = part.dataset[i]
        rng = np.random.default_rng(list(seed_key))
        image, mask, pad = weak_transform(sample.image, sample.mask, rng, self.crop, self.scale_range, self.base_size)
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "pad": torch.from_numpy(np.ascontiguousarray(pad)),
            "id": sample.id,
            "pseudo": part.pseudo,
        }
        has_mask = sample.mask is not None
        out["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long() if has_mask else None
        return out


def collate_labeled(items: list[dict]) -> LabeledBatch:
    masks = [
        it["mask"] if it["mask"] is not None else torch.full(it["pad"].shape, IGNORE, dtype=torch.long) for it in items
    ]
    return LabeledBatch(
        image=torch.stack([it["image"] for it in items]),
        mask=torch.stack(masks),
        ids=[it["id"] for it in items],
        pseudo=torch.tensor([it["pseudo"] for it in items], dtype=torch.bool),
    )


def collate_unlabeled(items: list[dict]) -> UnlabeledBatch:
    has_mask = all(it["mask"] is not None for it in items)
    return UnlabeledBatch(
        image=torch.stack([it["image"] for it in items]),
        pad=torch.stack([it["pad"] for it in items]),
        ids=[it["id"] for it in items],
        mask=torch.stack([it["mask"] for it in items]) if has_mask else None,
    )


class Stream:
    """An endless iterator of batches over a CropSet, resumable from a consumed-sample count."""

    def __init__(
        self,
        crops: CropSet,
        batch_size: int,
        seed: int,
        stream: int,
        workers: int = 0,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        pin_memory: bool = False,
    ):
        self.crops = crops
        self.sampler = StreamSampler(len(crops), seed, stream, rank, world, start)
        collate = collate_labeled if crops.labeled else collate_unlabeled
        self.loader = DataLoader(
            crops,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            drop_last=True,
            # A private generator: building the iterator must not draw from the global RNG, which dropout uses
            # and which resume restores before the streams start.
            generator=torch.Generator().manual_seed(seed * 31 + stream),
        )
        self._it = None

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)

    def __iter__(self):
        return self

    def close(self) -> None:
        self._it = None
