"""molf.eval: the sql, med and fact evaluators and the locked results-CSV appender."""

from molf.eval.config import EvalConfig
from molf.eval.results import RUN_COLUMNS, TASK_METRICS, append_row
from molf.eval.runner import evaluate_fact, evaluate_medmcqa, evaluate_sql, evaluate_task

__all__ = ["EvalConfig", "RUN_COLUMNS", "TASK_METRICS", "append_row", "evaluate_fact", "evaluate_medmcqa",
           "evaluate_sql", "evaluate_task"]
