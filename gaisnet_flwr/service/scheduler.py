"""Fine-tune or infer? Scheduling policies for the integrated service loop (paper Sec. IV-C, V-F).

Each round the edge either fine-tunes ("upgrades") one of its models or serves ("produces") the
inference request of that round. The profit model, stated explicitly (paper Table V):

  * serving a request for good g, made by model m(g), earns `base + step * q(m)`, where q(m) is
    the number of upgrades model m has received, saturating at `cap` (diminishing returns: after
    `cap` fine-tuning rounds the model's quality no longer rises);
  * an upgrade costs `upgrade_cost` now and raises q(m) by one (up to `cap`);
  * a round spent upgrading serves no request.

With the paper's numbers (base 50, step 25, upgrade cost 50, cap 2, demand A A B C C C C C C C on
devices a, b, c) always serving earns 500 (MSIP) and the best schedule 650 (MLCP): serve A, upgrade
c twice, then serve C at 100 for seven rounds.

Policies:
  * RS: a random action each round (seeded);
  * MSIP: the action with the largest immediate profit;
  * MLCP: exact finite-horizon dynamic programming over (round, upgrade levels) when the demand
    is known; with a demand distribution per round it maximises the expected cumulative profit.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from gaisnet_flwr.config import POLICIES

SERVE = "serve"
FINETUNE = "finetune"


class Action(str):
    """An integrated round's decision, as integrated.json records it: "serve" (the round's
    request) or "finetune:<e>" (one fine-tuning round of edge e's model)."""

    @classmethod
    def finetune(cls, edge: int) -> Action:
        return cls(f"{FINETUNE}:{edge}")

    @property
    def edge(self) -> int | None:
        """The edge to fine-tune; None to serve."""
        return None if self == SERVE else int(self.removeprefix(f"{FINETUNE}:"))


@dataclass(frozen=True)
class ProfitModel:
    """Prices of serving and fine-tuning (see the module docstring)."""

    models: tuple[str, ...]  # e.g. ("a", "b", "c")
    good_model: Mapping[str, str]  # good -> the model that produces it, e.g. {"A": "a"}
    base: float = 50.0
    step: float = 25.0
    upgrade_cost: float = 50.0
    cap: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.good_model.values()) - set(self.models))
        if unknown:
            raise ValueError(f"goods map to unknown model(s) {unknown}; models: {self.models}")
        if self.cap < 0:
            raise ValueError(f"cap must be >= 0, got {self.cap}")

    def price(self, good: str, levels: tuple[int, ...]) -> float:
        if good not in self.good_model:
            raise ValueError(f"unknown good {good!r}; goods: {sorted(self.good_model)}")
        return self.base + self.step * levels[self.models.index(self.good_model[good])]

    def actions(self) -> list[str]:
        """'serve' or the name of the model to upgrade."""
        return [SERVE, *self.models]

    def apply(
        self, action: str, good: str | None, levels: tuple[int, ...]
    ) -> tuple[float, tuple[int, ...]]:
        """Profit of `action` this round and the upgrade levels after it."""
        if action == SERVE:
            return (self.price(good, levels) if good is not None else 0.0), levels
        i = self.models.index(action)
        after = tuple(min(lv + 1, self.cap) if k == i else lv for k, lv in enumerate(levels))
        return -self.upgrade_cost, after


@dataclass
class Schedule:
    actions: list[str]
    profits: list[float]

    @property
    def total(self) -> float:
        return sum(self.profits)

    def cumulative(self) -> list[float]:
        out, running = [], 0.0
        for p in self.profits:
            running += p
            out.append(running)
        return out


def run_policy(
    policy: str, model: ProfitModel, demand: Sequence[str | None], seed: int = 0
) -> Schedule:
    """Schedule `len(demand)` rounds with `policy` (one of POLICIES) on a known demand."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")
    levels = tuple(0 for _ in model.models)
    rng = random.Random(seed)
    plan = mlcp_plan(model, tuple(demand)) if policy == "mlcp" else None
    actions, profits = [], []
    for t, good in enumerate(demand):
        if policy == "rs":
            action = rng.choice(model.actions())
        elif policy == "msip":
            action = max(model.actions(), key=lambda a: model.apply(a, good, levels)[0])
        else:
            assert plan is not None
            action = plan[t]
        profit, levels = model.apply(action, good, levels)
        actions.append(action)
        profits.append(profit)
    return Schedule(actions, profits)


def replay(model: ProfitModel, demand: Sequence[str | None], decisions: Sequence[str]) -> Schedule:
    """Price a given schedule in the paper's notation (Table V): a capital letter produces
    the demanded good (it must be that round's demand), a small letter upgrades that model."""
    if len(decisions) != len(demand):
        raise ValueError(f"{len(decisions)} decisions for {len(demand)} rounds of demand")
    levels = tuple(0 for _ in model.models)
    actions, profits = [], []
    for t, (decision, good) in enumerate(zip(decisions, demand, strict=True)):
        if decision in model.models:
            action = decision
        elif decision == good:
            action = SERVE
        else:
            raise ValueError(
                f"round {t + 1}: decision {decision!r} is neither a model to upgrade "
                f"({', '.join(model.models)}) nor the demanded good {good!r}"
            )
        profit, levels = model.apply(action, good, levels)
        actions.append(action)
        profits.append(profit)
    return Schedule(actions, profits)


def mlcp_plan(model: ProfitModel, demand: tuple[str | None, ...]) -> list[str]:
    """Exact DP: the action sequence maximising cumulative profit over the known demand."""

    @cache
    def best(t: int, levels: tuple[int, ...]) -> tuple[float, tuple[str, ...]]:
        if t == len(demand):
            return 0.0, ()
        options = []
        for action in model.actions():  # fixed order: ties go to serving, then model order
            profit, after = model.apply(action, demand[t], levels)
            rest, tail = best(t + 1, after)
            options.append((profit + rest, (action, *tail)))
        return max(options, key=lambda o: o[0])

    return list(best(0, tuple(0 for _ in model.models))[1])


def mlcp_expected(
    model: ProfitModel, demand_probs: Sequence[Mapping[str, float]]
) -> tuple[float, str]:
    """Stochastic demand: the first action maximising the expected cumulative profit, and that
    expected profit (serving earns the expectation over the round's demand distribution; the
    upgrade levels, the DP's state, do not depend on which good was demanded)."""

    @cache
    def best(t: int, levels: tuple[int, ...]) -> tuple[float, str]:
        if t == len(demand_probs):
            return 0.0, SERVE
        options = []
        for action in model.actions():
            if action == SERVE:
                gain = sum(p * model.price(g, levels) for g, p in demand_probs[t].items())
                after = levels
            else:
                gain, after = model.apply(action, None, levels)
            options.append((gain + best(t + 1, after)[0], action))
        return max(options, key=lambda o: o[0])

    return best(0, tuple(0 for _ in model.models))


def table_v() -> tuple[ProfitModel, list[str]]:
    """The paper's Table V setting: devices a, b, c make goods A, B, C; ten rounds of demand."""
    model = ProfitModel(models=("a", "b", "c"), good_model={"A": "a", "B": "b", "C": "c"})
    return model, ["A", "A", "B", "C", "C", "C", "C", "C", "C", "C"]


# -- the integrated service loop (paper Sec. IV-C, V-F) -------------------------------------------


@dataclass(frozen=True)
class QualityModel:
    """Profit driven by measured model quality, for the integrated loop.

    Serving a request on edge model e earns `value * accuracy_e` (the accuracy measured for that
    model) and pays its resource cost `serve_cost`; fine-tuning model e for one round costs
    `finetune_cost` (fixed cost plus resources) and is predicted to close a fraction `gain_e` of
    the gap to perfect accuracy (diminishing returns): a_e <- a_e + gain_e * (1 - a_e). The
    gains are fitted from the improvements measured so far.
    """

    value: float = 100.0
    finetune_cost: float = 20.0
    serve_cost: float = 0.0


def predicted_accuracy(accuracy: float, gain: float, rounds: int) -> float:
    return 1.0 - (1.0 - accuracy) * (1.0 - gain) ** rounds


def choose_action(
    policy: str,
    model: QualityModel,
    accuracy: Sequence[float],
    gains: Sequence[float],
    demand: Sequence[int],
    rng: random.Random,
) -> Action:
    """This round's action: serve (the request demand[0], an edge index) or fine-tune edge e.

    MLCP plans the remaining `demand` by exact DP over how often each edge is fine-tuned,
    with the predicted accuracies; it is re-run every round on fresh measurements (receding
    horizon), so its plan follows what fine-tuning actually achieved.
    """
    edges = range(len(accuracy))
    actions = [Action(SERVE), *(Action.finetune(e) for e in edges)]
    if policy == "rs":
        return rng.choice(actions)
    if policy == "msip":
        return max(
            actions,
            key=lambda a: (
                model.value * accuracy[demand[0]] - model.serve_cost
                if a == SERVE
                else -model.finetune_cost
            ),
        )
    if policy != "mlcp":
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")

    @cache
    def best(t: int, tuned: tuple[int, ...]) -> tuple[float, Action]:
        if t == len(demand):
            return 0.0, Action(SERVE)
        options = []
        for action in actions:
            if (tune := action.edge) is None:
                e = demand[t]
                gain = model.value * predicted_accuracy(accuracy[e], gains[e], tuned[e])
                gain -= model.serve_cost
                after = tuned
            else:
                gain = -model.finetune_cost
                after = tuple(k + (i == tune) for i, k in enumerate(tuned))
            options.append((gain + best(t + 1, after)[0], action))
        return max(options, key=lambda o: o[0])

    return best(0, tuple(0 for _ in edges))[1]


# -- the learning curve: what one fine-tuning round is worth (paper Sec. IV-C and V-F) -------------
PRIOR_GAIN = 0.3  # fraction of the accuracy gap one round closes, until measured


def fitted_gain(history: list[tuple[float, float]]) -> float:
    """The scheduler's prediction of what fine-tuning an edge achieves: the mean measured
    fraction of the accuracy gap closed per fine-tuning round, clipped to [0.01, 0.9]."""
    if not history:
        return PRIOR_GAIN
    fractions = [(after - before) / max(1e-6, 1.0 - before) for before, after in history]
    return min(0.9, max(0.01, sum(fractions) / len(fractions)))
