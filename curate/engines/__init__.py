"""Engines run the shards of a scoring run (and prune's mask tasks): in this process or on Ray. They sit
below the stages: a stage imports an engine, an engine never imports a stage."""
