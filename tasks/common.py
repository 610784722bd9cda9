"""What every task shares: where a run's files live and how results are cached.

Cache keys are content: the task's source plus its inputs, which are artifact hashes, seeds and
settings values (never tensors or models). Engines and servers travel as `backend`, the event
that lets background work start once decoding is under way as `gate`, and the run's noise drawn
ahead (tasks/noise.py) as `noise`: all excluded from the key.
Results persist under the data dir, so a re-run or a resume skips finished work. (Prefect's
DEFAULT policy keys on the flow run id, which a re-run does not share.)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.serializers import PickleSerializer
from prefect.utilities.importtools import from_qualified_name
from pydantic import Field

from artifacts.runs import check_run_id

CONTENT_CACHE = (INPUTS - "backend" - "gate" - "noise") + TASK_SOURCE
NO_CACHE = NO_CACHE


@dataclass(frozen=True)
class DataDir:
    """The layout of one data dir: ledger, artifacts, converted models, cached task results."""

    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def task_results(self) -> Path:
        return self.root / "task-results"

    def run_dir(self, run_id: str) -> Path:
        """A run's own files: report, reward curve, SGLang server logs."""
        path = self.root / "reports" / check_run_id(run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def result_storage(self) -> Path:
        # a Path is a local result store Prefect needs no saved block for
        self.task_results.mkdir(parents=True, exist_ok=True)
        return self.task_results


class OneLinePickleSerializer(PickleSerializer):
    """Prefect's pickle serializer with its base64 done in one call: `base64.encodebytes` loops in
    Python over 57-byte lines, 10 ms per population result (1,024 completions) on the GPU machine,
    on the path between two generations. Its output is read back by PickleSerializer's `loads`."""

    type: str = Field(default="es-pickle", frozen=True)

    def dumps(self, obj) -> bytes:
        return base64.b64encode(from_qualified_name(self.picklelib).dumps(obj))


def persisted(task, data_dir: DataDir):
    """The task with its results written under this data dir."""
    return task.with_options(result_storage=data_dir.result_storage(), persist_result=True, result_serializer=OneLinePickleSerializer())


def wait_for_gate(gate) -> None:
    """Background work of a generation starts once the GPU is decoding (see the flow): before that
    it would take the GIL from the short CPU steps that decoding waits on."""
    if gate is not None:
        gate.wait()
