"""Pipeline parallelism: point-to-point exchange between stages and the schedules."""
