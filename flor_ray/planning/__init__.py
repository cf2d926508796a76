"""Planning: turn a replay query into a plan of Ray tasks (one per run segment)."""
