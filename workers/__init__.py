"""What runs on Ray workers. Kept thin: the trial logic lives in `ssa_tune.trial`; this package only sets up
a worker process (Ray's `worker_process_setup_hook`) so every trial starts from the same environment."""
