"""Ray actors: one TrainWorker per rank (and, with the checkpoint engine, one NodeAgent per
node)."""
