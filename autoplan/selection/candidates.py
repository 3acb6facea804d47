"""The trained runs of a dataset that ``find-best`` can compare: every
``RESULTS/NAME/CONFIGURATION/RUN`` whose folds are finished, and the folds some of them lack
(which ``find-best --train-missing`` trains with the run's own options)."""

from dataclasses import dataclass, replace
from pathlib import Path

from autoplan.artifacts import Member
from autoplan.errors import InputError
from autoplan.paths import plans_file
from autoplan.runs import RunSpec
from autoplan.selection.budget import NOT_COMPARED


@dataclass
class Candidate:
    """One run folder and its finished folds ({fold index: fold_K folder})."""

    member: Member
    folds: dict

    def spec(self) -> RunSpec:
        return RunSpec.load(next(iter(self.folds.values())) / "plan.json")


def _finished(fold_dir: Path) -> bool:
    return (fold_dir / "plan.json").is_file() and any(
        (fold_dir / name).is_file() for name in ("checkpoint_best.pt", "checkpoint_final.pt"))


def discover_candidates(dataset_results: Path) -> list:
    """Every run folder under ``RESULTS/NAME`` with at least one finished fold, in name order."""
    candidates = []
    for configuration_dir in sorted(p for p in Path(dataset_results).glob("*") if p.is_dir()):
        for run_dir in sorted(p for p in configuration_dir.glob("*") if p.is_dir() and not p.name.startswith(".")):
            folds = {int(p.name[5:]): p for p in run_dir.glob("fold_*")
                     if p.name[5:].isdigit() and _finished(p)}
            if folds:
                member = Member(configuration=configuration_dir.name, run=run_dir.name)
                candidates.append(Candidate(member=member, folds=dict(sorted(folds.items()))))
    return candidates


def missing_folds(candidate: Candidate, folds: list) -> list:
    return [fold for fold in folds if fold not in candidate.folds]


def complete_candidates(candidates: list, folds: list) -> tuple:
    """(candidates with every fold of ``folds`` finished, {label: why another was left out})."""
    complete, excluded = [], {}
    for candidate in candidates:
        if candidate.member.configuration in NOT_COMPARED:
            excluded[candidate.member.label] = NOT_COMPARED[candidate.member.configuration]
            continue
        missing = missing_folds(candidate, folds)
        if missing:
            excluded[candidate.member.label] = (f"fold {', '.join(map(str, missing))} not trained or not "
                                                "finished (find-best --train-missing trains it)")
        else:
            complete.append(candidate)
    return complete, excluded


def train_missing_folds(dataset, folders, candidates: list, folds: list, time_budget_minutes=None) -> list:
    """Train the folds of ``folds`` that each candidate lacks, with the options its finished
    folds were trained with (same run folder); returns the Runs trained."""
    from autoplan.artifacts import Plan
    from autoplan.training import train

    plan_path = plans_file(folders.results, dataset.name)
    if not plan_path.is_file():
        raise InputError(plan_path, f"no plans.json (run `autoplan plan {dataset.name}` first)")
    plan = Plan.load(plan_path)
    runs = []
    for candidate in candidates:
        spec = candidate.spec()
        for fold in missing_folds(candidate, folds):
            fold_dir = candidate.member.folder(folders.dataset_results(dataset.name)) / f"fold_{fold}"
            options = replace(spec.options, configuration=spec.configuration.name, fold=str(fold),
                              run_name=candidate.member.run, overwrite=False,
                              resume=(fold_dir / "checkpoint_latest.pt").is_file(),
                              time_budget_minutes=time_budget_minutes or spec.options.time_budget_minutes)
            runs += train(dataset, plan, options, folders)
    return runs
