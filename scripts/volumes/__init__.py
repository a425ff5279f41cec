"""3D CT datasets (BTCV, STS-3D): file lists and splits, input checks, the volume transform chain, an on-disk
slice cache for training, a slice-batching volume inferer and an atomic NIfTI writer.

| dataset   | images                  | labels                             | HU window    | foreground           |
|-----------|-------------------------|------------------------------------|--------------|----------------------|
| ``btcv``  | ``img/img00XX.nii.gz``  | ``label/label00XX.nii.gz`` (0..13) | [-175, 250]  | all13 or transunet8  |
| ``sts3d`` | ``image/<name>.<ext>``  | ``label/<name>.<ext>`` (>= 0)      | [-100, 1100] | label > 0            |

Volumes may be NIfTI (read by nibabel), ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` files or DICOM series folders
(read by :class:`SimpleITKReader`); geometry is always MONAI's RAS affine. Splits are fixed: BTCV's 12 test
ids as in the authors' code, STS-3D by ``configs/sts3d_split.json``; the validation volumes are the last
``val_fraction`` (rounded up) of the sorted training names.

Flow: files -> :func:`volume_transforms` (load, check, orient to RAS so axial slices are the last axis,
window, scale to [-1, 1], binary foreground or --classes indices, resize in-plane, repeat to 3 channels) -> training:
the :class:`VolumeCacheDataset` keeps each preprocessed volume once on disk as ``npy`` (memory-mapped, read slice
by slice); inference: :class:`VolumeInferer` runs a 2D inferer on batches of axial slices and restacks them,
MONAI's ``Invertd`` maps the result back onto the input grid and :class:`SaveVolumed` writes it.
``python -m scripts.tools.benchmark_volumes`` measures its throughput against the bare networks.

Modules: :mod:`.reading` (readers, header checks), :mod:`.datalist` (datasets, file lists, splits),
:mod:`.transforms` (the volume chain), :mod:`.cache` (the slice cache), :mod:`.inference` (inferer, writer).
"""

from scripts.volumes import cache, datalist, inference, reading, transforms  # noqa: F401
