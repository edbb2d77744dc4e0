"""molf.optim: the routing AdamW, its score functions and declarative param groups.

Exports load lazily: importing a config module stays cheap (no torch)."""

from molf._lazy import lazy_exports

_EXPORTS = {
    "OptimConfig": "molf.optim.config",
    "MoLFAdamW": "molf.optim.molf_adamw",
    "RoutingDecision": "molf.optim.molf_adamw",
    "DEFAULT_RULES": "molf.optim.param_groups",
    "GroupRule": "molf.optim.param_groups",
    "ParamInfo": "molf.optim.param_groups",
    "build_param_groups": "molf.optim.param_groups",
    "SCORE_FNS": "molf.optim.scores",
    "ScoreFn": "molf.optim.scores",
    "get_score_fn": "molf.optim.scores",
    "register_score": "molf.optim.scores",
    "select_topk": "molf.optim.scores",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
