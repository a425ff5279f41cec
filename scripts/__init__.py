"""SDSeg bundle code: configs import this package (``$import scripts``) and reach every module through it."""

from scripts import data, engine, evaluation, io_utils, metrics, networks, sampler, volumes  # noqa: F401
