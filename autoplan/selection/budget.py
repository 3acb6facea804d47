"""How ``plan-and-train --find-best`` spends one time budget: which configurations and folds
it trains, the minutes each run gets, and what it keeps for find-best's own predictions."""

from dataclasses import dataclass

from autoplan.errors import InputError
from autoplan.planning.schedule import final_validation_seconds

MIN_RUN_MINUTES = 1.0       # below this a run is mostly start-up, final validation and report
NOT_COMPARED = {"3d_lowres": "3d_lowres is not trained: it pays off only as the first stage of a cascade, "
                             "which autoplan does not train yet"}


@dataclass
class BudgetSplit:
    configurations: list
    folds: list
    minutes_per_run: float | None     # None: no budget, each run trains the plan's epochs
    reserve_minutes: float            # find-best's out-of-fold predictions
    reason: str


def _reserve_minutes(plan, names: list, n_cases: int) -> float:
    return sum(final_validation_seconds(plan.configurations[name], n_cases, plan.device) for name in names) / 60


def split_budget(plan, budget_minutes, fold_sizes: list) -> BudgetSplit:
    """Every configuration of ``plan`` (3d_lowres aside) on as many folds as the budget allows:
    all of them when each run gets at least MIN_RUN_MINUTES after find-best's reserve (the
    planner's final-validation model applied to every validation case of every
    configuration), else the most that do. ``fold_sizes``: validation cases per fold of
    splits.json. Raises InputError when not even one fold fits."""
    n_folds, n_cases = len(fold_sizes), sum(fold_sizes)
    names = [name for name in plan.configurations if name not in NOT_COMPARED]
    left_out = [NOT_COMPARED[name] for name in plan.configurations if name in NOT_COMPARED]
    if not budget_minutes:
        reason = (f"no time budget: {len(names)} configuration(s) x {n_folds} folds, each trained for the "
                  "plan's epochs")
        return BudgetSplit(names, list(range(n_folds)), None, 0.0, "; ".join([reason, *left_out]))
    for k in range(n_folds, 0, -1):
        cases = sum(fold_sizes[:k])
        reserve = _reserve_minutes(plan, names, cases)
        per_run = (budget_minutes - reserve) / (len(names) * k)
        if per_run >= MIN_RUN_MINUTES:
            break
    else:
        raise InputError(None, f"--time-budget {budget_minutes:g}: find-best needs at least "
                               f"{len(names) * MIN_RUN_MINUTES + reserve:.1f} minutes for {len(names)} "
                               f"configuration(s) on one fold; give more time or train without --find-best")
    reason = (f"{len(names)} configuration(s) ({', '.join(names)}) x {k} fold(s) = {len(names) * k} runs of "
              f"{per_run:.2f} min; {reserve:.2f} min kept for find-best's predictions of {cases} out-of-fold "
              "cases per configuration; preprocessing comes on top")
    if k < n_folds:
        reason += (f"; {n_folds - k} fold(s) left out: all {n_folds} would leave each run under "
                   f"{MIN_RUN_MINUTES:g} min, so the choice rests on {cases} of {n_cases} cases")
    return BudgetSplit(names, list(range(k)), round(per_run, 3), round(reserve, 3), "; ".join([reason, *left_out]))
