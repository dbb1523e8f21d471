"""What training, evaluation and inference share: the train state and optimiser (state.py, optim.py),
the objective (objective.py) and this process's batches as global arrays (data.py). It imports none
of training/, evaluation/ or inference/, which stand side by side on it."""
