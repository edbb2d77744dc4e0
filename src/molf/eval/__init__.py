"""molf.eval: the sql, med and fact evaluators and the locked results-CSV appender.

Exports load lazily: ``import molf.eval.config`` (done by every config parse) stays cheap.
"""

from molf._lazy import lazy_exports

_EXPORTS = {
    "EvalConfig": "molf.eval.config",
    "RUN_COLUMNS": "molf.eval.results",
    "TASK_METRICS": "molf.eval.results",
    "append_row": "molf.eval.results",
    "evaluate_fact": "molf.eval.runner",
    "evaluate_medmcqa": "molf.eval.runner",
    "evaluate_sql": "molf.eval.runner",
    "evaluate_task": "molf.eval.runner",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
