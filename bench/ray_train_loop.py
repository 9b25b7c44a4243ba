"""The Ray Train side of the benchmarks: TorchTrainer with a FailureConfig, the same loop as
bench/peer_loop.py, checkpointing with ray.train.report every `every` steps (the loop a user
writes). A driver of its own, as a user's script is: `python bench/ray_train_loop.py CONFIG_JSON`
(bench/harness.py's run_ray_train writes the config and runs it).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def ray_train_driver(cfg_path: str) -> None:
    """Internal: the Ray Train job (a driver of its own, like a user's script)."""
    import ray
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = json.load(open(cfg_path))

    def loop(cfg):
        import tempfile

        import ray.train
        import torch
        import torch.distributed as dist

        from bench.peer_loop import Faults, apply_state, cpu_trainer, run, state_of

        rank, world = (
            ray.train.get_context().get_world_rank(),
            ray.train.get_context().get_world_size(),
        )
        trainer = cpu_trainer(cfg, rank, world)
        start = 0
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
            apply_state(trainer, state)
            start = state["step"]

        def after(step):
            if step % cfg["every"]:
                return
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save(state_of(trainer, step), os.path.join(d, "state.pt"))
                ray.train.report(
                    {"step": step}, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None
                )
            dist.barrier()

        faults = Faults(cfg["faults"], rank, cfg["marker_dir"]) if cfg["faults"] else None
        run(trainer, rank, start, cfg["steps"], faults, cfg["step_log"], after)

    # `address`: a cluster's (bench/cluster.py; the ranks spread over its nodes), else a local one
    address = cfg.get("address")
    ray.init(
        address=address or "local",
        **({} if address else {"num_cpus": 2}),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "GLOO_SOCKET_IFNAME": cfg.get("ifname", "lo"),
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.path.join(HERE, ".."),
            }
        },
    )
    scaling = ScalingConfig(
        num_workers=2,
        use_gpu=False,
        resources_per_worker={"CPU": 1},
        placement_strategy="SPREAD" if address else "PACK",
    )
    trainer = TorchTrainer(
        loop,
        train_loop_config=cfg,
        torch_config=TorchConfig(timeout_s=int(cfg["collective_timeout"])),
        scaling_config=scaling,
        run_config=RunConfig(
            storage_path=cfg["storage"],
            name="bench",
            failure_config=FailureConfig(max_failures=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    ray.shutdown()


if __name__ == "__main__":
    ray_train_driver(sys.argv[1])
