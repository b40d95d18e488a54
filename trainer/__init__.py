"""The trusted RL trainer: consumes accepted groups, publishes signed policy versions."""
