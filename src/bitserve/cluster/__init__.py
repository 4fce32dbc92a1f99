"""Several replicas on one machine: a throwaway PostgreSQL, nginx in front, the replicas
themselves, and the one-command local cluster (``python -m bitserve.cluster``)."""
