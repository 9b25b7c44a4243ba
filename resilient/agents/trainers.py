"""Where a rank's trainer comes from: a survivor's own, a warm spare's, or one built now.

Contract: `TrainerSource(spec, rundir)` builds trainers over the inputs staged in the run
directory (workers never read the driver's disk, nor the user's files). A spare calls
`warm_up()` on a thread of its own at idle priority: imports, data and model prepared on the
device its slot holds; `ready` is set once that ended (failed or not: a promotion then builds its
own). `keep(trainer)` holds a survivor's trainer for the next life. `take(restore, rank, device)`
returns (the trainer, how it was had): the kept one when restoring (a from-scratch start drops it:
its weights moved on, and never two models in memory at once), else the warm one, else one built
and prepared now.
"""

from __future__ import annotations

import logging
import threading
import time

from resilient.agents import rendezvous as rdv
from resilient.agents.priority import idle_this_thread
from resilient.agents.warmup import warm_imports
from resilient.config import JobSpec
from resilient.rundir import RunDir, staged
from resilient.rundir.layout import BASE_MODEL, DATA

log = logging.getLogger(__name__)


class TrainerSource:
    def __init__(self, spec: JobSpec, rundir: RunDir):
        self.spec, self.rundir = spec, rundir
        self.ready = threading.Event()
        self._kept = None  # a survivor's trainer, reused by the next life
        self._prepared = None  # a warm spare's

    def build(self, rank: int, world: int, device):
        from resilient.training.trainer import Trainer

        base, data = staged.local_dir(self.rundir, BASE_MODEL), staged.local_dir(self.rundir, DATA)
        return Trainer(self.spec, rank, world, base, device, data_dir=data)

    def warm_up(self) -> None:
        """Imports, data and model of a spare, on this thread only, at idle priority: it runs on
        CPU time the ranks leave unused (and at full speed in a restart, when the ranks are
        gone)."""
        idle_this_thread()
        t0 = time.perf_counter()
        try:
            warm_imports()
            trainer = self.build(
                -1, self.spec.cluster.num_workers, rdv.device_of(self.spec.cluster)
            )
            trainer.prepare()
            self._prepared = trainer
            log.info("spare warm in %.1fs (imports, data, model)", time.perf_counter() - t0)
        except Exception:  # the rank builds its own when promoted; nothing is lost
            log.exception("spare warm-up failed; a promotion builds the model then")
            self._prepared = None
        finally:
            self.ready.set()

    def keep(self, trainer) -> None:
        self._kept = trainer

    def take(self, restore, rank: int, world: int, device):
        kept, self._kept = self._kept, None
        if kept is not None and restore is not None:
            return kept, "survivor, model kept"
        del kept
        trainer, self._prepared = self._prepared, None
        if trainer is not None:
            return trainer, "warm spare"
        trainer = self.build(rank, world, device)
        trainer.prepare()
        return trainer, "model built now"
