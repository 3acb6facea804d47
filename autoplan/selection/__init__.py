"""``autoplan find-best``: choose among the trained configurations of a dataset (and every
pair's ensemble) on the same out-of-fold predictions, as nnU-Net's
``nnUNetv2_find_best_configuration``; the choice is ``RESULTS/NAME/best.json``
(``artifacts.BestChoice``), which ``predict --model RESULTS/NAME`` and ``export-model`` follow.

- ``candidates``: the run folders with finished folds, and training the folds they lack;
- ``scoring``: one pass over the validation cases scores singles and pairs;
- ``budget``: how ``plan-and-train --find-best`` splits a time budget across configurations
  and folds;
- ``entry``: ``find_best`` and the table it prints.
"""

from autoplan.selection.budget import BudgetSplit, split_budget
from autoplan.selection.entry import find_best, format_best_table

__all__ = ["BudgetSplit", "find_best", "format_best_table", "split_budget"]
