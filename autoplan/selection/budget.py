"""How ``plan-and-train --find-best`` spends one time budget: which configurations and folds
it trains, the minutes each run gets, and what it keeps for find-best's own predictions; and
how ``plan-and-train --config 3d_cascade_fullres`` shares one between the cascade's two stages
(:func:`cascade_budget`)."""

from dataclasses import dataclass

from autoplan.errors import InputError
from autoplan.planning.schedule import final_validation_seconds

MIN_RUN_MINUTES = 1.0       # below this a run is mostly start-up, final validation and report
NOT_COMPARED = {
    "3d_lowres": "3d_lowres is not trained here: it pays off only as the first stage of the cascade",
    # find-best scores each fold on its validation cases; a cascade's input there must be its first
    # stage's out-of-fold prediction, which the scoring does not assemble yet
    "3d_cascade_fullres": "3d_cascade_fullres is not compared by find-best yet (it needs all 5 folds of "
                          "3d_lowres first); train it with plan-and-train --config 3d_cascade_fullres",
}


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


def cascade_budget(budget_minutes, previous_folds: list, cascade_folds: list) -> tuple:
    """(minutes per run or None, why) for training a cascade's missing first-stage folds and then
    the cascade's own folds within one budget.

    Every run gets an equal share: the cascade needs the out-of-fold predictions of all five
    first-stage folds (each fold's are the input of a fifth of the cases, so none can be skimped
    without a worse input for those), and its own folds are full-resolution runs of about the
    same cost per iteration. Raises InputError when a share would be under MIN_RUN_MINUTES.
    """
    n_runs = len(previous_folds) + len(cascade_folds)
    first = (f"{len(previous_folds)} first-stage fold(s) ({', '.join(map(str, previous_folds))}) for the "
             "out-of-fold predictions" if previous_folds else "the first stage's out-of-fold predictions exist")
    if not budget_minutes:
        return None, f"{first}, then {len(cascade_folds)} cascade fold(s), each for the plan's epochs"
    per_run = budget_minutes / n_runs
    if per_run < MIN_RUN_MINUTES:
        raise InputError(None, f"--time-budget {budget_minutes:g}: the cascade needs {n_runs} runs ({first}, "
                               f"{len(cascade_folds)} cascade fold(s)) of at least {MIN_RUN_MINUTES:g} min each")
    return round(per_run, 3), (f"{first}, then {len(cascade_folds)} cascade fold(s): {n_runs} runs of "
                               f"{per_run:.2f} min (equal shares); preprocessing comes on top")
