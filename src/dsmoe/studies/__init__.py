"""Small-scale checks of the DeepSeekMoE and Loss-Free Balancing claims: `dsmoe study NAME`.

    balance         no balancing / expert-level aux loss (sigmoid: P from normalized and from raw scores) /
                    loss-free bias (sign, proportional) / bias + sequence-wise loss, under sigmoid and softmax
                    gates (Wang et al. 2024)
    balance-core    the subset of balance that answers the papers' claims (definitions.BALANCE_CORE), for the
                    bigger presets; it shares balance's runs
    shared          0, 1, 2, 4 shared experts at constant total and active parameters (DeepSeekMoE ablations)
    segmentation    m = 1, 2, 4, 8 at constant total and active parameters, with and without a shared
                    expert, next to dense models of the same active and the same total size (DeepSeekMoE)
    segmentation-core  the subset of segmentation + shared that answers DeepSeekMoE's claims
                    (definitions.SEGMENTATION_CORE: m = 1, 2, 4 without a shared expert, m = 4 with 1 and 2
                    shared, the dense model of the same active size), for the bigger presets; it shares their runs
    specialization  which kinds of token each routed expert takes, and the redundancy test: disable each
                    token's top-1..3 routed experts at inference and measure the rise in loss (DeepSeekMoE)
    upcycle         a trained dense model upcycled into the preset's MoE shape and trained on, against the dense
                    model trained on and the same MoE from scratch (on the extra tokens, and on as many in all)
    all             every study above

Each training run is cached under OUT/runs/<key>/ (key = hash of the model and training configs, the
seed and the corpus' fingerprint), so identical runs are shared between studies and an interrupted
study continues where it stopped.
Each study writes OUT/<study>/results.json, results.md and PNGs.

    definitions.py     what each study trains (its variants of the preset) and the constants shaping them
    runner.py          training and the run cache, aggregation over seeds, study() and run_study()
    specialization.py  the specialization study's measurements of a run (the analysis: dsmoe.analysis)
    upcycle.py         the upcycle study's runs: each arm continues from the dense run's HuggingFace folders
    report.py          the markdown tables
"""

from dsmoe.analysis import (
    DISABLE_SHARES,
    DISABLE_TOP,
    KINDS,
    char_kinds,
    disable_top_experts,
    mutual_information,
    token_kinds,
)
from dsmoe.studies.definitions import (
    BALANCE_CORE,
    BASE_TOP_K,
    DEFAULT_STEPS,
    SEGMENTATION_CORE,
    SEGMENTS,
    SHARED_COUNTS,
    SHARED_STUDY_M,
    STUDIES,
    VARIANTS,
    Variant,
    balance_core_variants,
    balance_variants,
    dense_models,
    segmentation_core_variants,
    segmentation_variants,
    segmented_model,
    shared_variants,
    specialization_variants,
    upcycle_setup,
    upcycle_variants,
)
from dsmoe.studies.runner import Runner, aggregate, mean_std, run_key, run_study, run_variants, study

__all__ = [
    "BALANCE_CORE", "BASE_TOP_K", "DEFAULT_STEPS", "DISABLE_SHARES", "DISABLE_TOP", "KINDS", "Runner",
    "SEGMENTATION_CORE", "SEGMENTS", "SHARED_COUNTS", "SHARED_STUDY_M", "STUDIES", "VARIANTS", "Variant",
    "aggregate", "balance_core_variants", "balance_variants", "char_kinds", "dense_models", "disable_top_experts",
    "mean_std", "mutual_information", "run_key", "run_study", "run_variants", "segmentation_core_variants",
    "segmentation_variants", "segmented_model", "shared_variants", "specialization_variants", "study",
    "token_kinds", "upcycle_setup", "upcycle_variants",
]
