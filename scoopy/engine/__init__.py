"""scoopy's engine: the state machine, the store (all SQL), the step runner and the worker."""
