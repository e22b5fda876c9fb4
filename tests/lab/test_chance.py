"""The chance-level check: each task's input-ignoring baseline, and the report's flag on runs that
never beat it (adanorm.lab.chance)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lab_helpers import REPO, smoke_cfg
from torch.nn import functional as F

from adanorm.lab.chance import CHANCE_MARGIN, check_chance, is_at_chance
from adanorm.lab.config import load_config
from adanorm.lab.report import collect_runs, write_report
from adanorm.lab.runinfo import norm_label
from adanorm.lab.task import get_task, majority_class_accuracy
from adanorm.lab.tasks.parsing.task import adjacent_attachment_uas


def test_at_chance_means_within_one_percent_of_chance_in_the_better_direction() -> None:
    assert CHANCE_MARGIN == 0.01
    # Accuracy, higher is better: chance 50 % needs more than 50.5 % to count as learned.
    assert is_at_chance(50.49, 50.0, higher_is_better=True)
    assert is_at_chance(30.0, 50.0, higher_is_better=True)
    assert not is_at_chance(50.51, 50.0, higher_is_better=True)
    # BPC, lower is better: chance 4.808 needs less than 4.760.
    assert is_at_chance(4.8104, 4.808, higher_is_better=False)
    assert is_at_chance(4.761, 4.808, higher_is_better=False)
    assert not is_at_chance(4.759, 4.808, higher_is_better=False)
    assert not is_at_chance(2.17, 4.808, higher_is_better=False)


def test_majority_class_accuracy_answers_the_most_frequent_train_label() -> None:
    level = majority_class_accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([1, 1, 0, 2]))
    assert (level.metric, level.value) == ("acc", 50.0)
    assert "(1)" in level.predictor
    # A tie goes to the smallest label.
    tie = majority_class_accuracy(torch.tensor([2, 0, 2, 0]), torch.tensor([0, 0, 0, 2]))
    assert tie.value == 75.0 and "(0)" in tie.predictor
    with pytest.raises(ValueError, match="non-empty"):
        majority_class_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([1]))


@dataclass
class _Sentence:
    heads: np.ndarray
    punct: np.ndarray

    def __len__(self) -> int:
        return len(self.heads)


def test_adjacent_attachment_scores_left_and_right_chains_without_punctuation() -> None:
    # "the dog ." : the -> dog, dog -> ROOT, . -> dog (punctuation, not scored).
    sentence = _Sentence(np.array([2, 0, 2]), np.array([False, False, True]))
    assert adjacent_attachment_uas([sentence], "right") == 50.0  # the -> dog right; dog -> . wrong
    assert adjacent_attachment_uas([sentence], "left") == 0.0  # the -> ROOT, dog -> the: wrong
    two = _Sentence(np.array([0, 1]), np.array([False, False]))  # a left chain, exactly
    assert adjacent_attachment_uas([sentence, two], "left") == 50.0
    with pytest.raises(ValueError, match="side"):
        adjacent_attachment_uas([sentence], "up")
    with pytest.raises(ValueError, match="no non-punctuation"):
        adjacent_attachment_uas([_Sentence(np.array([0]), np.array([True]))], "left")


def test_mt_chance_is_the_best_constant_distribution_for_the_label_smoothed_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = get_task("mt")(load_config("mt", "smoke", []), None)
    eps, vocab, eos = task.label_smoothing, 9, 2
    assert eps > 0
    generator = torch.Generator().manual_seed(0)
    train = [torch.randint(3, vocab, (int(n),), generator=generator) for n in (5, 7, 3, 9)]
    valid = [torch.randint(3, vocab, (int(n),), generator=generator) for n in (4, 6)]
    dictionary = type("Dictionary", (), {"eos": eos, "__len__": lambda self: vocab})()
    corpus = SimpleNamespace(
        dictionary=dictionary,
        splits={"train": SimpleNamespace(tgt=train), "valid": SimpleNamespace(tgt=valid)},
    )
    monkeypatch.setattr(task, "corpus", lambda: corpus)
    level = task.chance_level()

    def targets(sentences: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.cat([s, torch.tensor([eos])]) for s in sentences])

    def smoothed_loss(log_q: torch.Tensor, target: torch.Tensor) -> float:
        logits = log_q.expand(target.numel(), vocab)
        return float(F.cross_entropy(logits, target, label_smoothing=eps))

    counts = torch.bincount(targets(train), minlength=vocab).double()
    best = torch.log((1 - eps) * counts / counts.sum() + eps / vocab)
    assert level.metric == "loss"
    assert level.value == pytest.approx(smoothed_loss(best, targets(valid)), rel=1e-9)
    # Best on train among constant distributions: any other one costs more.
    for _ in range(20):
        other = torch.log_softmax(best + 0.3 * torch.randn(vocab, generator=generator,
                                                            dtype=torch.float64), 0)
        assert smoothed_loss(other, targets(train)) > smoothed_loss(best, targets(train))


def _digits_run(root: Path, norm: str, seed: int, valid: float, test: float) -> Path:
    """A finished digits run: the real resolved config and a results.json with these numbers."""
    run = root / "digits" / norm / f"seed{seed}"
    run.mkdir(parents=True)
    cfg = smoke_cfg(f"seed={seed}", f"model.norm={norm}")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = {
        "task": "digits", "dataset": "digits", "norm": norm, "norm_kwargs": {},
        "norm_label": norm_label(norm, {}), "seed": seed, "valid_metric": "acc",
        "valid_mode": "max", "test_metric": "acc", "test_metric_label": "accuracy (%)",
        "valid": {"acc": valid}, "test": {"acc": test},
    }
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_report_flags_a_run_at_chance_in_its_cell_its_comparisons_and_the_csv(
    tmp_path: Path,
) -> None:
    chance = get_task("digits")(smoke_cfg(), None).chance_level().value
    assert 5.0 < chance < 20.0  # ten balanced classes
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        _digits_run(runs, "layernorm", seed, 95.0 + seed, 94.0 + seed)
    _digits_run(runs, "adanorm", 1, 96.0, 95.5)
    stuck = _digits_run(runs, "adanorm", 2, chance, chance - 1.0)  # learned nothing
    _digits_run(runs, "adanorm", 3, chance * (1 + 2 * CHANCE_MARGIN), 20.0)  # barely, but learned
    report = write_report(runs, tmp_path / "out")

    (line,) = report.at_chance
    assert line.startswith(f"{stuck}: best valid acc {chance:.5g}, chance level {chance:.5g} ")
    assert report.unchecked == []
    rows = {r["norm"]: r for r in report.rows}
    assert rows["adanorm"]["runs_at_chance"] == 1
    assert rows["layernorm"]["runs_at_chance"] == 0
    md = report.markdown
    assert "(n=3) ⚠ 1 at chance |" in md
    assert "1 of 6: AdaNorm seed 2" in md
    delta_lines = [line for line in md.splitlines() if line.startswith("| digits | AdaNorm")]
    assert delta_lines and all("⚠ 1 at chance" in line for line in delta_lines)
    table = list(csv.DictReader((tmp_path / "out" / "report.csv").read_text().splitlines()))
    assert {r["norm"]: r["runs_at_chance"] for r in table} == {"layernorm": "0", "adanorm": "1"}


def test_a_column_that_cannot_be_checked_says_so_instead_of_passing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = _digits_run(runs, "layernorm", 1, 90.0, 90.0)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["task"] = "not-a-task"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = write_report(runs, tmp_path / "out")
    assert report.at_chance == []
    assert report.unchecked == [
        "digits: not checked: task 'not-a-task' is not registered here, so its chance level is "
        "unknown"
    ]
    assert "0 of 0 (1 not checked: task 'not-a-task'" in report.markdown
    table = list(csv.DictReader((tmp_path / "out" / "report.csv").read_text().splitlines()))
    assert table[0]["runs_at_chance"] == ""  # unknown, not zero


def test_missing_data_is_reported_as_not_checked(tmp_path: Path) -> None:
    cfg = load_config("lm", "smoke", ["seed=1"])
    run = {"config": cfg, "run_dir": "r", "valid_metric": "bpc", "valid_mode": "min",
           "valid": {"bpc": 5.0}}
    (check,) = check_chance([run], data_dir=str(tmp_path / "empty"))
    assert check.level is None and not check.at_chance
    assert "the data is missing" in check.reason and "ADANORM_DATA" in check.reason


def _shakespeare() -> Path | None:
    root = os.environ.get("ADANORM_DATA")
    path = Path(root).expanduser() if root else None
    return path if path and (path / "tiny_shakespeare" / "input.txt").is_file() else None


@pytest.mark.skipif(_shakespeare() is None, reason="tiny_shakespeare not under ADANORM_DATA")
def test_lm_chance_is_the_unigram_and_flags_the_committed_plateau_run() -> None:
    runs_dir = REPO / "results" / "converge" / "lm_cpu" / "runs"
    if not runs_dir.is_dir():
        pytest.skip(f"{runs_dir} not found")
    runs = collect_runs(runs_dir)
    checks = check_chance(runs)
    assert all(check.level is not None for check in checks)
    # The train split's character frequencies give 4.808 BPC on validation.
    assert {round(check.level.value, 3) for check in checks} == {4.808}
    flagged = sorted(Path(check.run_dir).relative_to(runs_dir).as_posix()
                     for check in checks if check.at_chance)
    assert flagged == ["tiny_shakespeare/adanorm_C0.5/seed4"]
    # A config from before a data key existed is completed with today's defaults, and says so.
    old = dict(runs[0]["config"], data=dict(runs[0]["config"]["data"]))
    del old["data"]["eval_streams"]
    (check,) = check_chance([{**runs[0], "config": old}])
    assert check.level is not None and "data.eval_streams" in check.level.predictor
