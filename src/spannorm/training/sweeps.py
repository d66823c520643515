"""Hydra callbacks for sweeps (configured under `hydra.callbacks`)."""

from __future__ import annotations

import logging
import math
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


class ScoreDivergedAs(Callback):
    """Report a diverged job (train() returns NaN in a multirun) to the sweeper as `value`.

    Optuna refuses a NaN objective, and hydra-optuna-sweeper then crashes the study instead of
    failing the trial; scoring it as the worst value (`inf` when minimizing a loss) keeps the study
    going and teaches the sampler that the region diverges."""

    def __init__(self, value: float = math.inf) -> None:
        self.value = float(value)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if job_return.status.name != "COMPLETED":
            return
        result = job_return.return_value
        if isinstance(result, float) and math.isnan(result):
            log.warning("job %s diverged: scored as %s", config.hydra.job.num, self.value)
            job_return.return_value = self.value
