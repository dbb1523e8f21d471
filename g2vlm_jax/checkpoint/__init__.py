"""Checkpoints: the kinds of checkpoint folder (folders.py), a run's train-state checkpoints (run.py),
params-only checkpoints and initialisation from them (params.py). The public names are re-exported
here: `from g2vlm_jax import checkpoint as ckpt_lib; ckpt_lib.make_manager(...)`."""
from g2vlm_jax.checkpoint.folders import KINDS, OFFICIAL, PARAMS, RUN, CheckpointFolder, open_checkpoint
from g2vlm_jax.checkpoint.params import ADDED_PARAMETERS, flat_params, initialise_from, load_params, save_params
from g2vlm_jax.checkpoint.run import (CheckpointMismatchError, check_compatible, check_same_tree, checkpoint_path,
                                      make_manager, read_metadata, restore, restore_latest, run_metadata, save)

__all__ = ["KINDS", "OFFICIAL", "PARAMS", "RUN", "CheckpointFolder", "open_checkpoint", "ADDED_PARAMETERS",
           "flat_params", "initialise_from", "load_params", "save_params", "CheckpointMismatchError", "check_compatible",
           "check_same_tree", "checkpoint_path", "make_manager", "read_metadata", "restore", "restore_latest",
           "run_metadata", "save"]
