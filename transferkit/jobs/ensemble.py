"""Joining saved probes into one model (`ensemble_probes`): predict and evaluate score an image by the mean of
the members' calibrated probabilities (transferkit.probe.ensemble)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from transferkit.errors import ParameterError
from transferkit.probe.ensemble import ENSEMBLE_FILE, FORMAT, MEMBERS_DIR
from transferkit.probe.linear import LinearProbe
from transferkit.probe.multilabel import MultiLabelProbe
from transferkit.probe.saved import PROBE_DIR, class_names, is_probe_dir, load_probe
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.outputs import building, check_output

ENSEMBLE_KIND = "ensemble"  # output kind (transferkit.runtime.outputs)


def ensemble_probes(probes: Sequence[str | Path], out: str | Path) -> Path:
    """Save `probes` (two or more probe folders from `train_probe`, of one class per image and the same classes)
    as one ensemble in `out`; return `out`. Each member is copied in, so the ensemble does not depend on where
    the probes lie later. Its members may differ in backbone, views, head and flip: each keeps its own codes."""
    paths = [Path(p) for p in probes]
    check_output(out, ENSEMBLE_KIND, inputs=paths)  # before the work
    members = _members(paths)
    classes = class_names(members[0])
    record = {"format": FORMAT, "classes": classes, "members": [
        {"dir": f"{MEMBERS_DIR}/{i}", "source": str(path), "model": probe.extra_["model"], "key": probe.extra_["key"]}
        for i, (path, probe) in enumerate(zip(paths, members))]}
    with building(out, ENSEMBLE_KIND, inputs=paths) as tmp:
        for i, path in enumerate(paths):
            shutil.copytree(path / PROBE_DIR, tmp / MEMBERS_DIR / str(i) / PROBE_DIR)
        write_json_atomic(tmp / ENSEMBLE_FILE, record)
    return Path(out)


def _members(paths: list[Path]) -> list[LinearProbe]:
    """The saved probes at `paths`, checked to make one ensemble; errors name the `probes` parameter."""
    if len(paths) < 2:
        raise ParameterError(f"The 'probes' parameter needs two or more probe folders; got {len(paths)}",
                             param="probes")
    if len({p.resolve() for p in paths}) < len(paths):
        raise ParameterError("The 'probes' parameter names one probe folder twice: each member counts once in "
                             "the mean", param="probes")
    if not_probes := [str(p) for p in paths if not is_probe_dir(p)]:
        raise ParameterError(f"The 'probes' parameter must name probe folders (from `transferkit probe`): "
                             f"'{not_probes[0]}' is not one (no '{PROBE_DIR}' folder)", param="probes")
    members = [load_probe(p) for p in paths]  # a damaged probe's error names its file
    for path, probe in zip(paths, members):
        why = ("is multi-label: an ensemble averages class probabilities of one class per image"
               if isinstance(probe, MultiLabelProbe) else None if probe.calibrated else
               "was saved before probes were calibrated: train it again")
        if why:
            raise ParameterError(f"The 'probes' parameter names '{path}', which {why}", param="probes")
    names = [sorted(class_names(m)) for m in members]
    if other := next((i for i, n in enumerate(names) if n != names[0]), None):
        raise ParameterError(f"The 'probes' parameter's probes must have the same classes: '{paths[0]}' has "
                             f"{', '.join(names[0])}; '{paths[other]}' has {', '.join(names[other])}",
                             param="probes")
    return members
