"""The stability run's reference: the first run's maps on disk, read back one case at a time.

:class:`ReferenceStore` writes each map of the reference run (the first noise seed) as ``<directory>/<index>.npy``
(float32, the dtype the metrics see, so the figures are those of maps held in memory) and keeps only its name and
shape in RAM. :mod:`scripts.stability` compares each later run's map with ``store.get(name)`` as soon as it is
produced, so a stability run holds about one case's maps, whatever the test set's size. The files are the scratch
of one run: :meth:`ReferenceStore.remove` deletes them; a store opened on a folder that a killed run left first
deletes that run's files, so leftovers never mix with a new reference.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = ["ReferenceStore"]

logger = logging.getLogger(__name__)

FILE = re.compile(r"\d{6}\.npy")  # the store's files; nothing else in the folder is touched


class ReferenceStore:
    """``{name: map}`` on disk. ``directory=None``: a fresh temporary folder (removed by :meth:`remove`, or when the
    store is garbage collected)."""

    def __init__(self, directory: str | Path | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="stability_reference_") if directory is None else None
        self.directory = Path(self._tmp.name if self._tmp else directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clear()  # a killed run's reference
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._files: dict[str, Path] = {}

    def _clear(self) -> None:
        for path in self.directory.iterdir():
            if FILE.fullmatch(path.name) and path.is_file():
                path.unlink()

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def put(self, name: str, value: torch.Tensor) -> None:
        if name in self.shapes:
            raise ValueError(f"two inputs named {name}: runs are paired by file name, names must be unique")
        array = value.detach().cpu().as_subclass(torch.Tensor).float().numpy()
        path = self.directory / f"{len(self.shapes):06d}.npy"
        np.save(path, array)
        self.shapes[name], self._files[name] = tuple(array.shape), path

    def get(self, name: str) -> torch.Tensor:
        """The map of ``name``, read from disk into a fresh tensor (the caller drops it when done)."""
        return torch.from_numpy(np.load(self._files[name]))

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self._files.values() if p.exists())

    def remove(self) -> None:
        """Delete the files (and the folder, when nothing else is in it)."""
        self.shapes, self._files = {}, {}
        if self._tmp is not None:
            self._tmp.cleanup()
            return
        if self.directory.is_dir():
            self._clear()
            try:
                self.directory.rmdir()
            except OSError:
                logger.warning(f"{self.directory}: left in place, it holds files that are not the reference's")
