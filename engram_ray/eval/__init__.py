"""Evaluation: TOFU-protocol metrics for causal LMs, class-wise unlearning metrics, figures.

``tofu`` holds the metric math on arrays; ``lm_scores`` scores an HF causal LM on QA splits;
``corpus`` generates the deterministic fictitious-authors corpus used in tests; ``train_lm``
fine-tunes tiny LMs on it; ``classify`` and ``plots`` serve the digits demo; ``edit_scores``
writes a batch request's eval summary (forget/retain loss of the base and the edited model).
"""

from engram_ray.eval import tofu
from engram_ray.eval.classify import SplitAccuracy, class_accuracy, split_accuracy, tug_of_war
from engram_ray.eval.corpus import (
    Splits,
    make_corpus,
    read_split,
    split_forget_retain,
    write_splits,
)
from engram_ray.eval.lm_scores import (
    QAScores,
    QATemplate,
    TofuEvaluator,
    TofuScores,
    encode_qa,
    evaluate_tofu,
    evaluate_tofu_dirs,
    score_qa,
    score_tofu,
)
from engram_ray.eval.train_lm import finetune_lm, torch_threads, train_tofu_pair

__all__ = [
    "QAScores",
    "QATemplate",
    "SplitAccuracy",
    "Splits",
    "TofuEvaluator",
    "TofuScores",
    "class_accuracy",
    "encode_qa",
    "evaluate_tofu",
    "evaluate_tofu_dirs",
    "finetune_lm",
    "make_corpus",
    "read_split",
    "score_qa",
    "score_tofu",
    "split_accuracy",
    "split_forget_retain",
    "tofu",
    "torch_threads",
    "train_tofu_pair",
    "tug_of_war",
    "write_splits",
]
