"""A user's task package, as a deployment would have one: loaded by workers through HOOKGATE_TASK_MODULES."""
