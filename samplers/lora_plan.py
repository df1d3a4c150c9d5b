"""What each training step trains on: the dataset's variants (captions with the trigger word, mirrored images for
flip, the empty caption for caption dropout), encoded once, and the epochs: every item `repeats` times per epoch in
a random order, batched within its resolution bucket, each item's noise and timestep drawn as it is used.

All choices come from the run's seeded CPU generator, in a fixed order, so a run is the same every time and a
resumed run replays the choices of the steps it skips."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..loaders.errors import LetterpressError

TRIGGER = "[trigger]"  # where a caption wants the trigger word (ai-toolkit's placeholder); elsewhere it goes first


@dataclass
class Draw:
    """One micro-batch: which encoded items, the noise, the timestep indices into the training schedule."""

    items: list
    noise: torch.Tensor
    t_index: torch.Tensor


@dataclass
class ItemTable:
    """Per dataset item: its repeats per epoch and where its variants are among the encoded items: (flipped,
    caption dropped) -> index. The plain variants are items 0..n-1, in the dataset's order."""

    repeats: list
    variants: list = field(default_factory=list)

    @classmethod
    def plain(cls, n: int, repeats: list | None = None) -> ItemTable:
        return cls(list(repeats or [1] * n), [{(False, False): i} for i in range(n)])


def with_trigger(caption: str, trigger: str) -> str:
    """The caption with the trigger word: in place of [trigger], else first ("trigger, caption")."""
    trigger = trigger.strip()
    if not trigger:
        return caption.replace(TRIGGER, "").strip()
    if TRIGGER in caption:
        return caption.replace(TRIGGER, trigger)
    return f"{trigger}, {caption}" if caption else trigger


def expand(images: list, captions: list, repeats: list, flip: bool, caption_dropout: float,
           trigger: str) -> tuple[list, list, ItemTable]:
    """The images and captions to encode (the plain items first, then the mirrored and caption-dropped variants;
    a variant's image is the same tensor object as its item's, so an encoder that caches by image encodes it once)
    and the table of where each item's variants are."""
    n = len(images)
    out_images = list(images)
    out_captions = [with_trigger(c, trigger) for c in captions]
    table = ItemTable.plain(n, repeats)
    mirrored = [torch.flip(img, dims=[2]) for img in images] if flip else []
    kinds = [(f, d) for f in ((False, True) if flip else (False,)) for d in ((False, True) if caption_dropout else
                                                                              (False,))][1:]
    for i in range(n):
        for f, d in kinds:
            table.variants[i][(f, d)] = len(out_images)
            out_images.append(mirrored[i] if f else images[i])
            out_captions.append("" if d else out_captions[i])
    return out_images, out_captions, table


def buckets_of(shapes: list) -> list[list[int]]:
    """Item indices grouped by latent shape (a batch is drawn from one bucket)."""
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return list(groups.values())


class StepPlan:
    """The micro-batches of each optimizer step, epoch after epoch."""

    def __init__(self, gen: torch.Generator, latents: list, table: ItemTable, batch_size: int, accumulation: int,
                 flip: bool, caption_dropout: float):
        self.gen, self.latents, self.table = gen, latents, table
        self.batch, self.accumulation = batch_size, accumulation
        self.flip, self.caption_dropout = flip, caption_dropout
        self.buckets = buckets_of([latents[table.variants[i][(False, False)]].shape for i in range(len(table.repeats))])
        largest = max(len(b) for b in self.buckets)
        if batch_size > largest:
            sizes = ", ".join(f"{len(b)} at {tuple(latents[b[0]].shape[-2:])}" for b in self.buckets)
            raise LetterpressError(f"batch_size {batch_size} is larger than every resolution bucket (images per "
                                   f"bucket, latent size: {sizes}); a batch holds images of one bucket. Lower "
                                   f"batch_size to {largest} or fewer, or add images of one aspect ratio.")
        self._queue: list[list[int]] = []
        self.epochs_started = 0

    def batches_per_epoch(self) -> int:
        return sum(math.ceil(sum(self.table.repeats[i] for i in b) / self.batch) for b in self.buckets)

    def epoch(self) -> list[list[int]]:
        """One epoch's batches of item indices: every item its repeats times, in a random order, each batch from
        one bucket (a bucket's last batch of the epoch may be smaller)."""
        occurrences = [i for i, r in enumerate(self.table.repeats) for _ in range(r)]
        bucket_of = {i: k for k, b in enumerate(self.buckets) for i in b}
        pending: dict[int, list[int]] = {}
        out = []
        for j in torch.randperm(len(occurrences), generator=self.gen).tolist():
            item = occurrences[j]
            batch = pending.setdefault(bucket_of[item], [])
            batch.append(item)
            if len(batch) == self.batch:
                out.append(pending.pop(bucket_of[item]))
        return out + [b for _, b in sorted(pending.items())]

    def next_batch(self) -> list[int]:
        if not self._queue:
            self._queue = self.epoch()
            self.epochs_started += 1
        return self._queue.pop(0)

    def draw(self, items: list[int]) -> Draw:
        """A batch's variants (mirrored with probability 1/2 under flip, caption dropped with probability
        caption_dropout), fp32 noise shaped like their latents, timestep indices in 0..999."""
        chosen = []
        for i in items:
            f = self.flip and bool(torch.rand(1, generator=self.gen) < 0.5)
            d = self.caption_dropout > 0 and bool(torch.rand(1, generator=self.gen) < self.caption_dropout)
            chosen.append(self.table.variants[i][(f, d)])
        shape = (len(chosen), *self.latents[chosen[0]].shape[1:])
        noise = torch.randn(shape, generator=self.gen, dtype=torch.float32)
        return Draw(chosen, noise, torch.randint(0, 1000, (len(chosen),), generator=self.gen))

    def next_step(self) -> list[Draw]:
        """The micro-batches of the next optimizer step (gradient accumulation: `accumulation` of them)."""
        return [self.draw(self.next_batch()) for _ in range(self.accumulation)]
