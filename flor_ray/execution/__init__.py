"""Execution: Ray tasks that replay run segments and write their partitions."""
