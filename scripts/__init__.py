"""SDSeg bundle code: configs import this package (``$import scripts``) and reach every module through it."""

from scripts import (  # noqa: F401
    autoencoder,
    baseline,
    classes,
    data,
    engine,
    evaluation,
    handlers,
    io_utils,
    metrics,
    networks,
    run_state,
    sampler,
    stability,
    transforms,
    volumes,
    weights,
)
