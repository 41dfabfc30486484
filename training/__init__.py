"""SD3.5-Flash distillation (teacher data, trajectory guidance, DMD with timestep sharing, split-timestep
fine-tuning). Imports :mod:`flash_core` only."""
