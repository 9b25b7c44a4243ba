"""The training loop the peers run in bench/recovery.py: the same model, data, optimizer and steps
as resilient (its Trainer), with the checkpoint loop a user writes for Ray Train or torchrun.

Also the fault injector shared by every system: a schedule of (fault, rank, step or training-time)
entries, each fired once (a marker file), by the rank's own process: SIGKILL or SIGSTOP, or for
`node_loss` (torchrun's elastic agents, one per simulated node) SIGKILL of its agent and itself.
Each rank-0 step is logged as "step unix_time step_seconds pid" so recovery can be measured from
outside.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.distributed as dist

from resilient.config import validate_tree
from resilient.training.trainer import Trainer


def make_spec(work: str, steps: int, seq_len: int, batch: int):
    return validate_tree(
        {
            "name": "bench",
            "data": {"path": f"{work}/corpus.txt", "seq_len": seq_len},
            "peft": {
                "method": "lora",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj", "v_proj"],
            },
            "train": {"steps": steps, "batch_size": batch, "seed": 7},
            "checkpoint": {"storage": f"{work}/runs"},
        }
    )


def cpu_trainer(cfg: dict, rank: int, world: int) -> Trainer:
    """The workload every peer runs: resilient's Trainer on one CPU thread, set up."""
    torch.set_num_threads(1)
    trainer = Trainer(
        make_spec(cfg["work"], cfg["steps"], cfg["seq_len"], cfg["batch"]),
        rank,
        world,
        cfg["base"],
        torch.device("cpu"),
    )
    trainer.setup()
    return trainer


class Faults:
    """Planned faults for this rank; `training_s` counts this life's time in training steps plus the
    previous lives' (kept in the marker folder), like resilient's at_time."""

    def __init__(self, schedule: list[dict], rank: int, marker_dir: str):
        self.schedule, self.rank, self.dir = schedule, rank, marker_dir
        os.makedirs(marker_dir, exist_ok=True)
        clock = os.path.join(marker_dir, f"clock-{rank}")
        self.base = float(open(clock).read()) if os.path.exists(clock) else 0.0
        self.clock_path, self.training_s = clock, self.base

    def tick(self, seconds: float) -> None:
        self.training_s += seconds
        with open(self.clock_path, "w") as f:
            f.write(str(self.training_s))

    def maybe(self, step: int) -> None:
        for i, f in enumerate(self.schedule):
            if f["rank"] != self.rank or os.path.exists(os.path.join(self.dir, f"fired-{i}")):
                continue
            if ("at_step" in f and f["at_step"] == step) or (
                "at_time" in f and self.training_s >= f["at_time"]
            ):
                with open(os.path.join(self.dir, f"fired-{i}"), "w") as m:
                    json.dump({"fault": f["fault"], "step": step, "t": time.time()}, m)
                if f["fault"] == "node_loss":  # the node's torchrun agent goes with it
                    os.kill(os.getppid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGSTOP if f["fault"] == "hang" else signal.SIGKILL)


class TorchSaveCheckpoints:
    """The user-written checkpoint loop: rank 0 torch.saves model/optimizer/scheduler state every
    `every` steps (atomic rename); every rank loads the newest on start."""

    def __init__(self, directory: str, every: int):
        self.dir, self.every = directory, every
        os.makedirs(directory, exist_ok=True)

    def load(self, trainer: Trainer) -> int:
        names = sorted(n for n in os.listdir(self.dir) if n.endswith(".pt"))
        if not names:
            return 0
        state = torch.load(os.path.join(self.dir, names[-1]), weights_only=False)
        apply_state(trainer, state)
        return state["step"]

    def save(self, trainer: Trainer, step: int, rank: int) -> None:
        if step % self.every:
            return
        if rank == 0:
            tmp = os.path.join(self.dir, f".step_{step:08d}.tmp")
            torch.save(state_of(trainer, step), tmp)
            os.replace(tmp, os.path.join(self.dir, f"step_{step:08d}.pt"))
        dist.barrier()


def state_of(trainer: Trainer, step: int) -> dict:
    return {
        "step": step,
        "model": {
            n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
        },
        "optim": trainer.optimizer.state_dict(),
        "sched": trainer.scheduler.state_dict(),
    }


def apply_state(trainer: Trainer, state: dict) -> None:
    params = dict(trainer.model.named_parameters())
    with torch.no_grad():
        for n, t in state["model"].items():
            params[n].copy_(t)
    trainer.optimizer.load_state_dict(state["optim"])
    trainer.scheduler.load_state_dict(state["sched"])


def run(
    trainer: Trainer,
    rank: int,
    start: int,
    total: int,
    faults: Faults | None,
    step_log: str | None,
    after_step=None,
) -> None:
    """Train from `start` to `total`; `after_step(step)` is the system's checkpoint hook."""
    for step in range(start + 1, total + 1):
        if faults:
            faults.maybe(step)
        t0 = time.perf_counter()
        r = trainer.step(step)
        if faults:
            faults.tick(time.perf_counter() - t0)
        if rank == 0 and step_log:
            with open(step_log, "a") as f:
                f.write(f"{step} {time.time()} {r.step_time + r.data_wait} {os.getpid()}\n")
        if after_step:
            after_step(step)


def torchrun_main() -> None:
    """Entry point of one torchrun rank: `python bench/peer_loop.py CONFIG_JSON`."""
    import sys
    from datetime import timedelta

    cfg = json.load(open(sys.argv[1]))
    timeout = timedelta(seconds=cfg["collective_timeout"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1":
        # elastic agents: rank 0 hosts a fresh store on a fresh port every round (env://)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    else:
        # torchrun's agent keeps one TCPStore across restarts, and the default group's keys
        # (default_pg/...) are the same in every round: a new rank can read the dead rank's stale
        # address and fail connectFullMesh. A per-restart prefix keeps the rounds apart.
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=timeout,
        )
        store = dist.PrefixStore(
            f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store
        )
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    if rank == 0 and cfg["step_log"]:
        with open(cfg["step_log"] + ".world", "a") as f:
            f.write(f"{os.getpid()} {world}\n")
    trainer = cpu_trainer(cfg, rank, world)
    ckpt = TorchSaveCheckpoints(cfg["ckpt_dir"], cfg["every"]) if cfg["every"] else None
    start = ckpt.load(trainer) if ckpt else 0
    faults = Faults(cfg["faults"], rank, cfg["marker_dir"]) if cfg["faults"] else None
    run(
        trainer,
        rank,
        start,
        cfg["steps"],
        faults,
        cfg["step_log"],
        (lambda s: ckpt.save(trainer, s, rank)) if ckpt else None,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    torchrun_main()
