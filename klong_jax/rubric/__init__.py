"""PaperBench-compatible rubric trees and their grading (imports no JAX).

    from klong_jax.rubric import load_rubric, grade, CommandJudge, LLMJudge, GradingContext
    rubric = load_rubric("task/rubric.json")            # RubricNode, validated
    with CommandJudge(timeout_s=60) as checks:           # leaves with a "check" command
        llm = LLMJudge("http://127.0.0.1:8000/v1", "judge-model").with_ancestors(rubric)
        result = grade(rubric, [checks, llm], GradingContext(episode_dir, task=task_text))
    result.score, result.summary(), result.to_dict()     # GradeResult tree

Ids may repeat (official rubrics do); verdicts are keyed by RubricNode.key, the node's position in its file.
"""
from klong_jax.rubric.command_judge import CommandJudge
from klong_jax.rubric.grading import (GradeResult, GradingContext, Judge, LeafVerdict, RecordedJudge,
                                      files_touched, grade, snapshot_files)
from klong_jax.rubric.llm_judge import LLMJudge, parse_verdict
from klong_jax.rubric.tree import (FINEGRAINED_CATEGORIES, LEAF_CATEGORIES, RubricError, RubricNode,
                                   code_dev_variant, depth, duplicate_ids, ensure_keys, load_rubric,
                                   parse_rubric, read_text_file, resources_provided_variant)

__all__ = ["FINEGRAINED_CATEGORIES", "LEAF_CATEGORIES", "CommandJudge", "GradeResult", "GradingContext",
           "Judge", "LLMJudge", "LeafVerdict", "RecordedJudge", "RubricError", "RubricNode",
           "code_dev_variant", "depth", "duplicate_ids", "ensure_keys", "files_touched", "grade",
           "load_rubric", "parse_rubric", "parse_verdict", "read_text_file", "resources_provided_variant",
           "snapshot_files"]
