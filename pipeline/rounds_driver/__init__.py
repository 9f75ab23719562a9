"""``distill-rounds``: rounds of generate-completions → precompute-teacher → train-student, each
step a subprocess through the stage's own command line, resumable at the first step not marked
complete in ``rounds.json``. Imports neither stage package (the stages run as processes).

- :mod:`pipeline.rounds_driver.plan`: the per-round stage configs, completion markers, commands.
- :mod:`pipeline.rounds_driver.driver`: the loop and ``rounds.json`` (:func:`run_rounds`).
"""
from pipeline.rounds_driver.driver import read_state, run_rounds
from pipeline.rounds_driver.plan import STEPS, round_configs, step_complete

__all__ = ["STEPS", "read_state", "round_configs", "run_rounds", "step_complete"]
