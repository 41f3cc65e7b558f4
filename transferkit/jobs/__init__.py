"""The jobs the CLI runs, composed from codes, store, probe and plots; each is a plain function.

One module per job: `extract` (codes, the sweep), `probe` (fit, score, save a probe), `ensemble` (probes joined
into one model), `predict` (predictions and evaluations of what was trained). Their names are imported here, so
`transferkit.jobs.NAME` stays the API."""

from __future__ import annotations

from transferkit.jobs.ensemble import ENSEMBLE_KIND, ensemble_probes  # noqa: F401 - the API
from transferkit.jobs.extract import (  # noqa: F401 - the API
    SELECT_CANDIDATES,
    SELECT_MAX_VIEWS,
    SELECT_MIN_GAIN,
    SWEEP_FILE,
    SWEEP_FILES,
    SWEEP_SAMPLES,
    check_like,
    extract_features,
    like_options,
    load_data,
    read_sweep,
    sweep_features,
)
from transferkit.jobs.predict import (  # noqa: F401 - the API
    EVALUATION_KIND,
    RUN_CONFIG,
    evaluate_model,
    image_files,
    model_kind,
    predict_images,
)
from transferkit.jobs.probe import (  # noqa: F401 - the API
    PROBE_KIND,
    ProbeReport,
    check_compatible,
    copy_codes,
    mirror_codes,
    multilabel_targets,
    store_images,
    train_probe,
)
