"""Samplers for several processes: repeated augmentation for training, an exact split for evaluation."""
import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class RASampler(Sampler):
    """Repeated augmentation (Hoffer et al.; used by DeiT): each selected image appears ``repeats`` times per
    epoch, its copies dealt to consecutive processes in turn, each copy a differently augmented view (with fewer
    processes than ``repeats``, a process gets more than one copy of an image). An epoch still has about
    ``len(dataset)`` samples in total (as in DeiT, ``len(dataset)`` rounded down to a multiple of 256, split
    evenly over the processes; below 256 images, all of them), so fewer distinct images are visited."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, repeats: int = 3,
                 seed: int = 0):
        if repeats < 1:
            raise ValueError('repeats must be at least 1')
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.repeats, self.seed, self.epoch = shuffle, repeats, seed, 0
        self.num_samples = int(math.ceil(len(dataset) * repeats / num_replicas))
        self.total_size = self.num_samples * num_replicas
        # Per process, len(dataset) rounded down to a multiple of 256, / num_replicas, samples are used each epoch
        # (len(dataset) / num_replicas, rounded up, below 256 images)
        self.num_selected = int(math.floor(len(dataset) // 256 * 256 / num_replicas)) or \
            int(math.ceil(len(dataset) / num_replicas))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        indices = [i for i in indices for _ in range(self.repeats)]
        # padded to total_size by starting over, as often as needed: with fewer copies than processes (a training
        # set of one image on 7 processes) one pass left the last ranks with nothing, while __len__ promised them
        # num_selected samples, and those ranks skipped the epoch's collectives (the job hung)
        indices = (indices * -(-self.total_size // max(len(indices), 1)))[:self.total_size]
        mine = indices[self.rank:self.total_size:self.num_replicas]
        return iter(mine[:self.num_selected])

    def __len__(self) -> int:
        return self.num_selected

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class DistributedEvalSampler(Sampler):
    """Each process takes every ``num_replicas``-th image, with no padding, so summed counts are exact."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
