"""moe-bench: the benchmark suite (speed, balance, utilization per replication mode
against the single-process model) and the cluster simulator."""
