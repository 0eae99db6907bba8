"""`probe-study`: what the hidden states know, the seed papers' protocols, one study per module.

    python -m backend probe-study --model smollm2-135m --study saplma --format json
    python -m backend probe-study --study tcav --concept-file C --random-file R --class-file K --target " yes" --layer 12

Studies live in backend/analyses/probes/<name>.py; each has `add_options(p)` (its own options,
names unique across studies) and `run_cli(a) -> dict` (the payload: `run_key` and the study's
fields). This module adds the common options and dispatches; `study` is added to every payload.
"""

from __future__ import annotations

import importlib

from ..errors import InvalidSpec

STUDIES = {"saplma": "backend.analyses.probes.saplma", "tcav": "backend.analyses.probes.tcav",
           "clue": "backend.analyses.probes.clue", "harm-refusal": "backend.analyses.probes.harm_refusal"}


def _module(study: str):
    if study not in STUDIES:
        raise InvalidSpec(f"unknown study {study!r}: one of {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[study])


def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--study", required=True, help="|".join(STUDIES))
    p.add_argument("--seed", type=int, default=0)
    for study in STUDIES:
        try:
            module = _module(study)
        except ModuleNotFoundError:   # a study not written yet: its options are missing, run says so
            continue
        module.add_options(p)


def run_cli(a) -> dict:
    payload = _module(a.study).run_cli(a)
    return {"study": a.study, **payload}
