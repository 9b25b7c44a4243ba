"""TOL: the job's state machine, failure policy, journal and the loop that acts on them."""
