"""Deterministic distributed streaming loader over a window store (Zarr or Arrow).

Which windows a rank reads, and in which order, is a pure function of
``(seed, epoch, world_size, rank)`` and the store -- the DataLoader worker count changes how
the work is spread, never the batches. It is computed by the functions and the
:class:`EpochPlan` below and tested over grids of world shapes and worker counts.

1. **Selection.** The split's windows, optionally only the labelled ones (``labelled_only``)
   and/or the stratified ``label_fraction`` subset of
   :func:`data_pipeline.splits.label_fraction_subset` (seed: ``subset_seed`` if given, else
   the one the manifest recorded for that fraction, else the config's split seed, else 0;
   with the recorded seed, the subset is checked against the checksum the manifest holds).
   ``N`` = number selected.
2. **Epoch stream.** The chunks (K stored windows each, the unit of reading) are permuted by a
   PCG64 generator seeded from ``(seed, epoch)`` (identity when ``shuffle=False``); the stream
   is the selected windows of the chunks in that order (N positions).
3. **Rank partition.** Rank ``r`` takes stream positions ``[r*L, (r+1)*L)`` (mod N) with
   ``L = floor(N / (W*B)) * B`` (``remainder="drop"``: ranks are disjoint) or
   ``L = ceil(N / (W*B)) * B`` (``"wrap"``: the stream wraps to its start, every window is
   covered). Every rank has exactly ``num_batches = L / B`` batches, so collectives never hang.
4. **Local shuffle.** The rank's slice is cut into blocks of ``round(shuffle_block_windows/B)``
   whole batches; windows are permuted within each block by a generator seeded from
   ``(seed, epoch, rank, block)`` -- the deterministic equivalent of a shuffle buffer. Batch
   ``j`` is the ``j``-th run of B windows of the result ("batch id").
5. **Workers.** Batches are emitted in batch-id order, whatever ``num_workers`` is. The work
   left after ``c`` consumed batches is cut into units at block boundaries
   (:func:`block_units`: the tail of the current block, then whole blocks); DataLoader worker
   ``i`` of ``n`` reads units ``i, i+n, ...`` (:func:`worker_units`) and yields each as one
   item, and torch's in-order round robin over workers hands them back in unit order, which
   the loader splits into batches. So the emission order is a pure function of
   ``(seed, epoch, world_size, rank)`` (trivially also of ``num_workers``: it does not depend
   on it), every block is read by exactly one worker, and one shared-memory message carries a
   whole unit instead of one per batch. A unit is read by loading each chunk it touches once
   (whole chunks, never single windows) and gathering its windows with one numpy fancy index
   per chunk. (Compared with dealing single batches round-robin to workers, units of whole
   blocks mean no duplicate chunk reads, far fewer inter-process messages, and an order
   independent of ``num_workers``, so a run can resume with a different worker count.)
6. **Resume.** :class:`StreamingLoader` counts the batches it hands to the caller (in the main
   process, so it works with workers). ``state_dict()`` records epoch and batches consumed (plus
   the settings that define the order); ``load_state_dict`` then continues with exactly the
   batches an uninterrupted run would give -- with any ``num_workers`` and on any rank (the
   state of rank 0 can be loaded everywhere: only the rank-independent position is used). A
   state from a different world size, batch size, seed, split size or shuffle setting raises
   ``ValueError``. Iterating again after an epoch ended replays the same epoch (no
   auto-advance): call ``set_epoch(e)``; ``set_epoch`` with the current epoch keeps a resumed
   position. Breaking out of a loop mid-epoch and iterating again continues where it stopped.
   ``persistent_workers=True`` keeps DataLoader workers alive across epochs: the (epoch,
   first batch) of each iteration is passed to them through a small shared-memory tensor.
7. ``normalize=True`` applies the manifest's train-split per-channel mean/std (float32).

Batches are dicts: ``x`` float32 ``(B, C, T)``, ``label`` int64 ``(B,)`` (-1 = unlabelled),
``index`` int64 ``(B,)`` (window index within the split), ``subject`` int64 ``(B,)``; they are
views of their unit's buffers (no copy per batch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import StoreError
from data_pipeline.store import Store, bfloat16_to_float32, open_store

__all__ = [
    "open_loader",
    "StreamingLoader",
    "StoreBlockStream",
    "EpochPlan",
    "select_windows",
    "chunk_order",
    "rank_windows",
    "block_units",
    "worker_units",
]

# Domain tags keep the chunk-order and block-shuffle random streams independent.
_TAG_CHUNKS = 0x43484E4B
_TAG_BLOCK = 0x424C4F43


# --------------------------------------------------------------------------------------------
# pure functions


def chunk_order(num_chunks: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's chunk permutation (PCG64 seeded from (seed, epoch)); identity without shuffle."""
    if not shuffle:
        return np.arange(num_chunks, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_CHUNKS, seed, epoch])))
    return rng.permutation(num_chunks).astype(np.int64)


def block_permutation(n: int, seed: int, epoch: int, rank: int, block: int) -> np.ndarray:
    """The within-block shuffle of block ``block`` of rank ``rank``."""
    ss = np.random.SeedSequence([_TAG_BLOCK, seed, epoch, rank, block])
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


def rank_windows(num_selected: int, batch_size: int, world_size: int, remainder: str = "drop") -> int:
    """Windows per rank per epoch: a whole number of batches, identical on every rank."""
    per = world_size * batch_size
    if remainder == "drop":
        return (num_selected // per) * batch_size
    if remainder == "wrap":
        return -(-num_selected // per) * batch_size
    raise ValueError(f"remainder {remainder!r}: choose 'drop' or 'wrap'")


def block_units(num_batches: int, batches_per_block: int, consumed: int = 0) -> np.ndarray:
    """Work units left after ``consumed`` batches: rows ``(block, first_batch, stop_batch)``.

    Unit ``u`` covers batch ids ``[first, stop)`` of block ``block`` (the first unit may be the
    tail of a partly consumed block); in unit order they are exactly batches ``consumed..``.
    """
    if num_batches <= consumed:
        return np.zeros((0, 3), np.int64)
    k0 = consumed // batches_per_block
    blocks = np.arange(k0, -(-num_batches // batches_per_block), dtype=np.int64)
    first = np.maximum(blocks * batches_per_block, consumed)
    stop = np.minimum((blocks + 1) * batches_per_block, num_batches)
    return np.stack([blocks, first, stop], axis=1)


def worker_units(units: np.ndarray, worker: int, num_workers: int) -> np.ndarray:
    """The units worker ``worker`` of ``num_workers`` yields: ``units[worker::num_workers]``.

    torch's in-order DataLoader takes one item from each worker in turn, so it hands the units
    back in their original order whatever ``num_workers`` is.
    """
    return units[worker :: max(1, num_workers)]


def select_windows(
    labels: np.ndarray,
    *,
    labelled_only: bool = False,
    subset: np.ndarray | None = None,
) -> np.ndarray | None:
    """Sorted window indices to read, or None for all windows."""
    sel = None
    if subset is not None:
        sel = np.unique(np.asarray(subset, dtype=np.int64))
    if labelled_only:
        lab = np.flatnonzero(np.asarray(labels) >= 0).astype(np.int64)
        sel = lab if sel is None else np.intersect1d(sel, lab)
    return sel


class EpochPlan:
    """What rank ``rank`` reads in epoch ``epoch`` and in which order (pure; see module docstring).

    ``chunk_bounds``: ``(num_chunks, 2)`` window ranges of the stored chunks; ``selected``:
    sorted window indices to read (None = all).
    """

    def __init__(
        self,
        chunk_bounds: np.ndarray,
        selected: np.ndarray | None,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        world_size: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        remainder: str = "drop",
        shuffle_block_windows: int = 4096,
    ):
        bounds = np.asarray(chunk_bounds, dtype=np.int64).reshape(-1, 2)
        self.bounds = bounds
        self.selected = selected
        if selected is None:
            self._sel_lo = bounds[:, 0]
            counts = bounds[:, 1] - bounds[:, 0]
        else:
            self._sel_lo = np.searchsorted(selected, bounds[:, 0])
            counts = np.searchsorted(selected, bounds[:, 1]) - self._sel_lo
        self.batch_size = B = int(batch_size)
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.shuffle = shuffle
        self.num_selected = int(counts.sum())
        self.order = chunk_order(bounds.shape[0], seed, epoch, shuffle)
        self._cum = np.concatenate([[0], np.cumsum(counts[self.order])]).astype(np.int64)
        self.rank_windows = rank_windows(self.num_selected, B, world_size, remainder)
        self.num_batches = self.rank_windows // B
        self.batches_per_block = max(1, int(round(shuffle_block_windows / B)))
        self.block_windows = self.batches_per_block * B
        self.num_blocks = -(-self.num_batches // self.batches_per_block)

    def windows_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window index and chunk of each epoch-stream position (0 <= position < N)."""
        slot = np.searchsorted(self._cum, positions, side="right") - 1
        chunk = self.order[slot]
        idx = self._sel_lo[chunk] + (positions - self._cum[slot])
        win = idx if self.selected is None else self.selected[idx]
        return win.astype(np.int64, copy=False), chunk

    def block(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows (in batch order) and their chunks of block ``k`` of this rank."""
        a = k * self.block_windows
        b = min(self.rank_windows, a + self.block_windows)
        pos = (self.rank * self.rank_windows + np.arange(a, b, dtype=np.int64)) % max(1, self.num_selected)
        win, chunk = self.windows_at(pos)
        if self.shuffle:
            p = block_permutation(b - a, self.seed, self.epoch, self.rank, k)
            win, chunk = win[p], chunk[p]
        return win, chunk

    def batches(self) -> np.ndarray:
        """``(num_batches, B)`` window indices of every batch id (for tests and inspection)."""
        if self.num_batches == 0:
            return np.zeros((0, self.batch_size), np.int64)
        wins = np.concatenate([self.block(k)[0] for k in range(self.num_blocks)])
        return wins.reshape(self.num_batches, self.batch_size)

    def window_range(self, k: int, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows and chunks of batch ids ``[first, stop)``, all inside block ``k``."""
        win, chunk = self.block(k)
        base = k * self.batches_per_block
        a, b = (first - base) * self.batch_size, (stop - base) * self.batch_size
        return win[a:b], chunk[a:b]


# --------------------------------------------------------------------------------------------
# dataset


def _empty(shape: tuple, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    return t.share_memory_() if shared else t


class StoreBlockStream(IterableDataset):
    """Yields the work units of one rank and epoch from batch ``start`` on (a torch IterableDataset).

    Each item is one unit (a run of whole batches inside one shuffle block, see
    :func:`block_units`) as a dict of tensors with ``(num_batches_in_unit * B, ...)`` rows;
    :class:`StreamingLoader` runs it under ``DataLoader(ds, batch_size=None, num_workers=n)``,
    splits units into batches, and keeps ``epoch``/``start`` up to date.
    """

    def __init__(
        self,
        store: Store,
        split: str,
        batch_size: int,
        selected: np.ndarray | None,
        labels: np.ndarray,
        subjects: np.ndarray,
        *,
        seed: int,
        world_size: int,
        rank: int,
        shuffle: bool,
        remainder: str,
        shuffle_block_windows: int,
        mean_std: tuple[np.ndarray, np.ndarray] | None,
    ):
        super().__init__()
        self.store, self.split, self.batch_size = store, split, batch_size
        self.selected, self.labels, self.subjects = selected, labels, subjects
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.shuffle, self.remainder, self.shuffle_block_windows = shuffle, remainder, shuffle_block_windows
        self.mean_std = mean_std
        self.bounds = store.chunk_bounds(split)
        # (epoch, first batch) of the next iteration, in shared memory so that persistent
        # DataLoader workers see what the main process set before each new iteration.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def start(self) -> int:
        return int(self._position[1])

    def set_position(self, epoch: int, start: int) -> None:
        """The next ``iter()`` (here or in any worker) yields epoch ``epoch`` from batch ``start``."""
        self._position[0] = epoch
        self._position[1] = start

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return EpochPlan(
            self.bounds,
            self.selected,
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            world_size=self.world_size,
            rank=self.rank,
            shuffle=self.shuffle,
            remainder=self.remainder,
            shuffle_block_windows=self.shuffle_block_windows,
        )

    def load_unit(self, plan: EpochPlan, k: int, first: int, stop: int) -> dict[str, torch.Tensor]:
        """Read batches ``[first, stop)`` of block ``k``: each chunk touched is read once, whole."""
        win, chunk = plan.window_range(k, first, stop)
        store = self.store
        C, T = store.num_channels, store.window
        # Torch-owned buffers (shared memory inside a DataLoader worker), so a unit crosses to
        # the main process without a copy and its batches are views of it.
        shared = get_worker_info() is not None
        x_t = _empty((win.shape[0], C, T), torch.float32, shared)
        x = x_t.numpy()
        srt = np.argsort(chunk, kind="stable")
        uniq, starts = np.unique(chunk[srt], return_index=True)
        ends = np.append(starts[1:], srt.shape[0])
        bf16 = store.dtype == "bfloat16"
        for c, a, b in zip(uniq.tolist(), starts.tolist(), ends.tolist()):
            dst = srt[a:b]
            raw = store.read_chunk_raw(self.split, c)  # the whole chunk (a zero-copy view for Arrow)
            rows = raw[win[dst] - self.bounds[c, 0]]  # one fancy index per chunk
            x[dst] = bfloat16_to_float32(rows) if bf16 else rows
        if self.mean_std is not None:
            mean, std = self.mean_std
            x -= mean[None, :, None]
            x /= std[None, :, None]
        out = {"x": x_t}
        for name, values in (("label", self.labels[win]), ("index", win), ("subject", self.subjects[win])):
            t = _empty(values.shape, torch.int64, shared)
            t.numpy()[:] = values
            out[name] = t
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.plan()  # epoch and start are read here, when iteration begins
        units = block_units(plan.num_batches, plan.batches_per_block, self.start)
        for k, first, stop in worker_units(units, worker, n).tolist():
            yield self.load_unit(plan, k, first, stop)


# --------------------------------------------------------------------------------------------
# loader


class StreamingLoader:
    """Iterable of batches for one rank; ``num_batches`` per epoch, identical on every rank."""

    _STATE_CHECKS = ("split", "world_size", "batch_size", "seed", "num_selected", "num_batches",
                     "shuffle", "remainder", "shuffle_block_windows")

    def __init__(self, dataset: StoreBlockStream, *, epoch: int, num_workers: int, prefetch_factor: int,
                 persistent_workers: bool = False, multiprocessing_context: Any = None):
        self.dataset = dataset
        self.store = dataset.store
        self.split = dataset.split
        self.batch_size = dataset.batch_size
        self.seed, self.world_size, self.rank = dataset.seed, dataset.world_size, dataset.rank
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.persistent_workers = bool(persistent_workers and num_workers > 0)
        self._dataloader: DataLoader | None = None
        plan = dataset.plan(epoch)
        self.num_selected = plan.num_selected
        self.num_batches = plan.num_batches
        self.epoch = epoch
        self.batches_consumed = 0

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's :class:`EpochPlan` for ``epoch`` (default: the current epoch)."""
        return self.dataset.plan(self.epoch if epoch is None else epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its first batch (a no-op if it is already the current epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.batches_consumed = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batches_consumed >= self.num_batches:  # epoch finished: replay it (no auto-advance)
            self.batches_consumed = 0
        ds = self.dataset
        ds.set_position(self.epoch, self.batches_consumed)
        if self.num_workers == 0:
            units: Any = iter(ds)
        else:
            if self._dataloader is None or not self.persistent_workers:
                self._dataloader = DataLoader(
                    ds,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_factor,
                    persistent_workers=self.persistent_workers,
                    in_order=True,
                    multiprocessing_context=self.multiprocessing_context,
                )
            units = iter(self._dataloader)
        B = self.batch_size
        for unit in units:
            for r in range(0, unit["x"].shape[0], B):
                self.batches_consumed += 1  # counted as handed to the caller
                yield {name: v[r : r + B] for name, v in unit.items()}

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "split": self.split,
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "num_batches": self.num_batches,
            "batch_size": self.batch_size,
            "num_selected": self.num_selected,
            "shuffle": self.dataset.shuffle,
            "remainder": self.dataset.remainder,
            "shuffle_block_windows": self.dataset.shuffle_block_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` stopped (any rank and worker count may load it)."""
        mine = self.state_dict()
        for key in self._STATE_CHECKS:
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={mine[key]!r}; resume with the same data and loader settings (or start a new run)"
                )
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= self.num_batches:
            raise ValueError(f"loader state batches_consumed={consumed} is outside 0..{self.num_batches}")
        self.epoch = int(state["epoch"])
        self.batches_consumed = consumed


def _label_fraction_selection(store: Store, split: str, labels: np.ndarray, fraction: float,
                              subset_seed: int | None) -> np.ndarray:
    try:
        from data_pipeline.splits import label_fraction_subset
    except ImportError as e:  # pragma: no cover - splits ships with the package
        raise StoreError(f"label_fraction needs data_pipeline.splits.label_fraction_subset ({e})") from None
    recorded = (
        store.manifest.get("splits", {}).get(split, {}).get("label_fractions", {}).get(repr(float(fraction)))
    )
    seed = subset_seed
    if seed is None and isinstance(recorded, dict) and "seed" in recorded:
        seed = int(recorded["seed"])
    if seed is None:
        seed = int(store.manifest.get("config", {}).get("split", {}).get("seed", 0) or 0)
    idx = np.asarray(label_fraction_subset(labels, float(fraction), seed), dtype=np.int64)
    want = recorded.get("indices_sha256") if isinstance(recorded, dict) else None
    if want is not None and subset_seed is None:
        got = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()
        if got != want:
            raise StoreError(
                f"the label_fraction={fraction} subset of split {split!r} differs from the one recorded "
                f"when store {str(store.path)!r} was prepared (the subset code changed?); re-run "
                "`timemae data prepare` so evaluation uses a reproducible subset"
            )
    return idx


def open_loader(
    store: str | Path | Store,
    split: str,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle: bool = True,
    remainder: Literal["drop", "wrap"] = "drop",
    shuffle_block_windows: int = 4096,
    normalize: bool = False,
    label_fraction: float | None = None,
    labelled_only: bool = False,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    subset_seed: int | None = None,
    multiprocessing_context: Any = None,
) -> StreamingLoader:
    """A :class:`StreamingLoader` over ``split`` of ``store`` for rank ``rank`` of ``world_size``.

    Batches are shuffled per (seed, epoch) unless ``shuffle=False``; ``remainder`` drops or
    wraps the windows that do not fill a whole batch on every rank; ``shuffle_block_windows``
    is the size of the in-memory shuffle block; ``normalize`` applies the train mean/std;
    ``labelled_only`` / ``label_fraction`` restrict the windows read (``subset_seed``
    overrides the subset seed recorded in the manifest). ``num_workers`` DataLoader
    processes read ahead ``prefetch_factor`` units each; ``persistent_workers`` keeps them
    across epochs (saves their start-up per epoch); ``multiprocessing_context`` is passed to
    the DataLoader (e.g. "spawn"). None of the worker settings changes the batches.
    """
    checks = {
        "batch_size": batch_size >= 1,
        "world_size": world_size >= 1,
        "rank": 0 <= rank < world_size,
        "num_workers": num_workers >= 0,
        "seed": seed >= 0,
        "epoch": epoch >= 0,
        "shuffle_block_windows": shuffle_block_windows >= 1,
        "prefetch_factor": prefetch_factor >= 1,
        "remainder": remainder in ("drop", "wrap"),
        "label_fraction": label_fraction is None or 0.0 < label_fraction <= 1.0,
    }
    for name, ok in checks.items():
        if not ok:
            value = locals()[name]
            hint = {
                "rank": f"must be in [0, world_size={world_size})",
                "remainder": "choose 'drop' or 'wrap'",
                "label_fraction": "must be in (0, 1] or None",
            }.get(name, "out of range")
            raise ValueError(f"open_loader: {name}={value!r} {hint}")
    st = store if isinstance(store, Store) else open_store(store)
    if split not in st.splits:
        raise StoreError(f"store {str(st.path)!r} has no split {split!r}; it has {', '.join(st.splits)}")
    labels = st.read_column(split, "label")
    subjects = st.read_column(split, "subject")
    subset = None
    if label_fraction is not None:
        subset = _label_fraction_selection(st, split, labels, label_fraction, subset_seed)
    selected = select_windows(labels, labelled_only=labelled_only, subset=subset)
    mean_std = st.normalization() if normalize else None
    ds = StoreBlockStream(
        st, split, int(batch_size), selected, labels, subjects,
        seed=int(seed), world_size=int(world_size), rank=int(rank), shuffle=bool(shuffle),
        remainder=remainder, shuffle_block_windows=int(shuffle_block_windows), mean_std=mean_std,
    )
    return StreamingLoader(ds, epoch=int(epoch), num_workers=int(num_workers),
                           prefetch_factor=int(prefetch_factor), persistent_workers=persistent_workers,
                           multiprocessing_context=multiprocessing_context)
