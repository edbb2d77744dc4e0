"""molf.optim: the routing AdamW, its score functions and declarative param groups."""

from molf.optim.config import OptimConfig
from molf.optim.molf_adamw import MoLFAdamW, RoutingDecision
from molf.optim.param_groups import DEFAULT_RULES, GroupRule, ParamInfo, build_param_groups
from molf.optim.scores import SCORE_FNS, ScoreFn, get_score_fn, register_score, select_topk

__all__ = ["DEFAULT_RULES", "GroupRule", "MoLFAdamW", "OptimConfig", "ParamInfo", "RoutingDecision", "SCORE_FNS",
           "ScoreFn", "build_param_groups", "get_score_fn", "register_score", "select_topk"]
