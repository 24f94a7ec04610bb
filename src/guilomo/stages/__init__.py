"""Pipeline stages: each a plain `run(config, inputs) -> outputs` plus a thin CLI."""
