"""Recording: the runtime behind the public verbs, checkpoints and the writer."""
