"""Report templates and their static assets (code-free): read by ssa_tune.report."""
