"""`python -m ssa_tune`: the command line (what a Ray job runs with the cluster's own Python)."""

from .cli import main

main()
