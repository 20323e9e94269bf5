"""Search agents of the bit-width search: each proposes one option per layer and learns from the reward.

Every agent sees the same :class:`Problem`: per layer, its options ordered from the smallest to the largest
(the last one usually float), their stored bytes, their predicted loss (the Fisher proxy of
:mod:`slimquant.search.sensitivity`: 0 for float) and a feature vector (index, kind, shape, parameters, FLOPs,
sensitivity), normalized to [0, 1] per feature. An agent answers :meth:`Agent.ask` with a list of option indices
(one per layer) and is told the reward of the configuration that was actually evaluated (the search may have
changed the proposal to fit a size budget) with :meth:`Agent.tell`. Agents are deterministic given their seed
and the rewards they are told, so a resumed search replays its history through them and goes on where it
stopped.

- ``rl`` (:class:`DDPGAgent`): HAQ / AMC's deterministic-policy actor-critic acting layer by layer.
- ``evolutionary`` (:class:`EvolutionaryAgent`): tournament selection, uniform crossover, one-step mutations.
- ``greedy`` (:class:`GreedyAgent`): the knapsack path of the sensitivity model, searched by bisection, then a
  hill climb of single-layer moves and swaps.
- ``random`` (:class:`RandomAgent`): uniform random options.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from slimquant.errors import SlimquantError

FEATURES = ("index", "kind", "in", "out", "kernel", "params", "flops", "sensitivity")


@dataclass
class Problem:
    """What an agent knows of the search space (``L`` layers, ``K`` options each, ordered small to large).

    ``bytes[l][k]`` / ``cost[l][k]``: stored bytes and predicted loss growth of layer ``l`` under option ``k``;
    ``features[l]``: the layer's state features (:data:`FEATURES`), each in [0, 1]."""

    names: list[str]
    options: list[str]
    bytes: list[list[float]]
    cost: list[list[float]]
    features: list[list[float]]

    def __post_init__(self) -> None:
        n, k = len(self.names), len(self.options)
        if n == 0 or k == 0:
            raise SlimquantError("the search problem needs at least one layer and one option")
        for what in ("bytes", "cost", "features"):
            rows = getattr(self, what)
            if len(rows) != n:
                raise SlimquantError(f"problem.{what} has {len(rows)} rows for {n} layers")
        if any(len(r) != k for r in (*self.bytes, *self.cost)):
            raise SlimquantError(f"problem.bytes / cost need {k} options per layer")

    @property
    def layers(self) -> int:
        return len(self.names)

    @property
    def k(self) -> int:
        return len(self.options)

    def size(self, choice: Sequence[int]) -> float:
        return sum(self.bytes[i][c] for i, c in enumerate(choice))

    def predicted(self, choice: Sequence[int]) -> float:
        return sum(self.cost[i][c] for i, c in enumerate(choice))

    def fit(self, choice: Sequence[int], budget: float) -> list[int]:
        """``choice`` lowered until its size is within ``budget`` bytes (HAQ's action limiting): each step lowers
        the layer whose next lower option adds the least predicted loss per byte saved. Returns the smallest
        configuration when even that is over the budget."""
        out = list(choice)
        total = self.size(out)
        if total <= budget:
            return out

        def entry(i: int) -> tuple[float, int, int] | None:
            c = out[i]
            if c == 0:
                return None
            saved = self.bytes[i][c] - self.bytes[i][c - 1]
            extra = self.cost[i][c - 1] - self.cost[i][c]
            return (extra / saved if saved > 0 else math.inf, i, c)

        heap = [e for e in (entry(i) for i in range(len(out))) if e is not None]
        heapq.heapify(heap)
        while total > budget and heap:
            _, i, c = heapq.heappop(heap)
            if out[i] != c:  # stale
                continue
            total -= self.bytes[i][c] - self.bytes[i][c - 1]
            out[i] = c - 1
            e = entry(i)
            if e is not None:
                heapq.heappush(heap, e)
        return out


class Agent:
    """The interface: ``ask() -> [option index per layer]``, ``tell(choice, reward)``."""

    NAME = ""

    def __init__(self, problem: Problem, seed: int = 0, num_warmup: int = 10, max_episode: int = 100) -> None:
        self.problem, self.seed = problem, seed
        self.num_warmup, self.max_episode = max(0, int(num_warmup)), max(1, int(max_episode))
        self.rng = random.Random(seed)
        self.told = 0

    def random_choice(self) -> list[int]:
        return [self.rng.randrange(self.problem.k) for _ in range(self.problem.layers)]

    def ask(self) -> list[int]:
        raise NotImplementedError

    def tell(self, choice: Sequence[int], reward: float) -> None:
        self.told += 1


class RandomAgent(Agent):
    """Uniform random options (the baseline every other agent has to beat)."""

    NAME = "random"

    def ask(self) -> list[int]:
        return self.random_choice()


class EvolutionaryAgent(Agent):
    """A steady-state genetic algorithm: ``num_warmup`` random individuals, then children of two parents
    chosen by tournament (size 3) among the ``population`` best so far, uniform crossover, and each gene moved
    one option up or down with probability ``2 / layers``."""

    NAME = "evolutionary"

    def __init__(self, problem: Problem, seed: int = 0, num_warmup: int = 10, max_episode: int = 100,
                 population: int = 16, tournament: int = 3) -> None:  # fmt: skip
        super().__init__(problem, seed, num_warmup, max_episode)
        self.population, self.tournament = population, tournament
        self.pool: list[tuple[float, list[int]]] = []

    def _parent(self) -> list[int]:
        best = sorted(self.pool, key=lambda p: -p[0])[: self.population]
        picks = [best[self.rng.randrange(len(best))] for _ in range(min(self.tournament, len(best)))]
        return max(picks, key=lambda p: p[0])[1]

    def ask(self) -> list[int]:
        if self.told < max(self.num_warmup, 2) or len(self.pool) < 2:
            return self.random_choice()
        a, b = self._parent(), self._parent()
        child = [x if self.rng.random() < 0.5 else y for x, y in zip(a, b)]
        p = min(1.0, 2.0 / self.problem.layers)
        for i in range(len(child)):
            if self.rng.random() < p:
                child[i] = min(self.problem.k - 1, max(0, child[i] + self.rng.choice((-1, 1))))
        return child

    def tell(self, choice: Sequence[int], reward: float) -> None:
        super().tell(choice, reward)
        self.pool.append((reward, list(choice)))


class GreedyAgent(Agent):
    """Greedy on the sensitivity model, refined by evaluations.

    The path: from every layer at its smallest option, repeatedly take the upgrade with the largest predicted
    loss reduction per added byte (the knapsack's greedy order); position ``p`` of the path is the
    configuration after ``p`` upgrades. The agent evaluates a few evenly spaced positions, then bisects towards
    the best one (reward assumed unimodal along the path), then hill-climbs from the best configuration with
    single-layer moves down (least predicted loss per byte saved first) and swaps (one layer up, one down),
    keeping a move when its reward is higher. Warm-up episodes are not used (the path replaces them)."""

    NAME = "greedy"
    COARSE = 5

    def __init__(self, problem: Problem, seed: int = 0, num_warmup: int = 10, max_episode: int = 100) -> None:
        super().__init__(problem, seed, num_warmup, max_episode)
        self.moves = self._path()
        self.rewards: dict[int, float] = {}  # path position -> reward
        self.pending: list[int] = sorted({round(j * len(self.moves) / (self.COARSE - 1)) for j in range(self.COARSE)})
        self.best: tuple[float, list[int]] | None = None
        self.climb: list[list[int]] | None = None
        self.asked: tuple[str, int] | None = None

    def _path(self) -> list[tuple[int, int]]:
        pb = self.problem
        cur = [0] * pb.layers
        moves: list[tuple[int, int]] = []

        def best_up(i: int) -> tuple[float, int] | None:
            c, top = cur[i], None
            for j in range(c + 1, pb.k):
                added = pb.bytes[i][j] - pb.bytes[i][c]
                gain = pb.cost[i][c] - pb.cost[i][j]
                ratio = gain / added if added > 0 else (math.inf if gain > 0 else 0.0)
                if top is None or ratio > top[0]:
                    top = (ratio, j)
            return top

        heap = []
        for i in range(pb.layers):
            b = best_up(i)
            if b is not None:
                heap.append((-b[0], i, cur[i], b[1]))
        heapq.heapify(heap)
        while heap:
            _, i, c, j = heapq.heappop(heap)
            if cur[i] != c:
                continue
            cur[i] = j
            moves.append((i, j))
            b = best_up(i)
            if b is not None:
                heapq.heappush(heap, (-b[0], i, cur[i], b[1]))
        return moves

    def at(self, pos: int) -> list[int]:
        cur = [0] * self.problem.layers
        for i, j in self.moves[:pos]:
            cur[i] = j
        return cur

    def _next_position(self) -> int | None:
        while self.pending:
            p = self.pending.pop(0)
            if p not in self.rewards:
                return p
        if not self.rewards:
            return None
        known = sorted(self.rewards)
        best = max(known, key=lambda p: (self.rewards[p], -p))
        k = known.index(best)
        gaps = []
        if k + 1 < len(known) and known[k + 1] - best > 1:
            gaps.append((self.rewards[known[k + 1]], (best + known[k + 1]) // 2))
        if k > 0 and best - known[k - 1] > 1:
            gaps.append((self.rewards[known[k - 1]], (best + known[k - 1]) // 2))
        if not gaps:
            return None
        return max(gaps)[1]  # the side whose neighbour is better first

    def _neighbours(self, base: list[int]) -> list[list[int]]:
        pb = self.problem
        downs, ups = [], []
        for i, c in enumerate(base):
            if c > 0:
                saved = pb.bytes[i][c] - pb.bytes[i][c - 1]
                downs.append(((pb.cost[i][c - 1] - pb.cost[i][c]) / max(saved, 1e-9), i))
            if c + 1 < pb.k:
                added = pb.bytes[i][c + 1] - pb.bytes[i][c]
                ups.append((-(pb.cost[i][c] - pb.cost[i][c + 1]) / max(added, 1e-9), i))
        downs.sort()
        ups.sort()
        out: list[list[int]] = []
        for (_, d), (_, u) in zip(downs, ups):
            one = list(base)
            one[d] -= 1
            out.append(one)
            if u != d:
                swap = list(one)
                swap[u] += 1
                out.append(swap)
        return out

    def ask(self) -> list[int]:
        pos = self._next_position() if self.climb is None else None
        if pos is not None:
            self.asked = ("path", pos)
            return self.at(pos)
        if self.climb is None:
            assert self.best is not None or not self.rewards
            base = self.best[1] if self.best is not None else self.at(len(self.moves))
            self.climb = self._neighbours(base)
        if not self.climb:
            self.asked = ("random", 0)
            return self.random_choice()  # the climb found no better neighbour: explore
        self.asked = ("climb", 0)
        return self.climb.pop(0)

    def tell(self, choice: Sequence[int], reward: float) -> None:
        super().tell(choice, reward)
        if self.asked is not None and self.asked[0] == "path":
            self.rewards[self.asked[1]] = reward
        self.asked = None
        if self.best is None or reward > self.best[0]:
            improved_in_climb = self.climb is not None
            self.best = (reward, list(choice))
            if improved_in_climb:
                self.climb = self._neighbours(self.best[1])


class _MLP(nn.Sequential):
    def __init__(self, d_in: int, hidden: int, out_act: nn.Module | None) -> None:
        layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, 1)]  # fmt: skip
        if out_act is not None:
            layers.append(out_act)
        super().__init__(*layers)


class DDPGAgent(Agent):
    """HAQ / AMC's agent: a deterministic actor ``mu(s) in [0, 1]`` per layer and a critic ``Q(s, a)``.

    An episode walks the layers in order; layer ``t``'s state is its features plus the previous layer's action,
    its action ``a_t`` (the actor's output plus truncated-normal exploration noise whose width decays from 0.5
    to 0.05 over the episodes after the warm-up) picks option ``floor(a_t * K)``. The first ``num_warmup``
    episodes act uniformly at random and only fill the replay memory. Every transition of an episode carries
    that episode's reward (as in HAQ and AMC), normalized by the mean and spread of the rewards seen; the
    critic regresses it (a Monte-Carlo target, with no bootstrapping), the actor follows the critic's gradient
    ``max_a Q(s, a)``. Each episode after the warm-up trains ``min(layers, 64)`` minibatches of 64 transitions.
    """

    NAME = "rl"

    def __init__(self, problem: Problem, seed: int = 0, num_warmup: int = 10, max_episode: int = 100,
                 hidden: int = 64, lr_actor: float = 1e-3, lr_critic: float = 1e-3, batch: int = 64,
                 sigma: float = 0.5, sigma_end: float = 0.05) -> None:  # fmt: skip
        super().__init__(problem, seed, num_warmup, max_episode)
        d = len(problem.features[0]) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = _MLP(d, hidden, nn.Sigmoid())
            self.critic = _MLP(d + 1, hidden, None)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.features = torch.tensor(problem.features, dtype=torch.float32)
        self.batch, self.sigma0, self.sigma_end = batch, sigma, sigma_end
        self.memory_s: list[torch.Tensor] = []
        self.memory_a: list[torch.Tensor] = []
        self.memory_r: list[float] = []
        self.last_actions: list[float] | None = None

    def sigma(self) -> float:
        span = max(1, self.max_episode - self.num_warmup - 1)
        done = min(max(0, self.told - self.num_warmup), span)
        return self.sigma0 * (self.sigma_end / self.sigma0) ** (done / span)

    def _to_index(self, a: float) -> int:
        return min(self.problem.k - 1, int(a * self.problem.k))

    def _states(self, actions: Sequence[float]) -> torch.Tensor:
        prev = torch.tensor([0.0, *actions[:-1]], dtype=torch.float32)[:, None]
        return torch.cat([self.features, prev], dim=1)

    def ask(self) -> list[int]:
        if self.told < self.num_warmup:
            actions = [self.rng.random() for _ in range(self.problem.layers)]
        else:
            actions = []
            prev, sigma = 0.0, self.sigma()
            with torch.no_grad():
                for t in range(self.problem.layers):
                    s = torch.cat([self.features[t], torch.tensor([prev])])
                    mu = float(self.actor(s[None])[0, 0])
                    a = self._truncated(mu, sigma)
                    actions.append(a)
                    prev = a
        self.last_actions = actions
        return [self._to_index(a) for a in actions]

    def _truncated(self, mu: float, sigma: float) -> float:
        for _ in range(100):
            a = self.rng.gauss(mu, sigma)
            if 0.0 <= a <= 1.0:
                return a
        return min(1.0, max(0.0, mu))

    def tell(self, choice: Sequence[int], reward: float) -> None:
        k = self.problem.k
        asked = self.last_actions if self.last_actions is not None else [(c + 0.5) / k for c in choice]
        # the applied configuration: an action the search changed (size budget) becomes its option's centre
        actions = [a if self._to_index(a) == c else (c + 0.5) / k for a, c in zip(asked, choice)]
        self.last_actions = None
        self.memory_s.append(self._states(actions))
        self.memory_a.append(torch.tensor(actions, dtype=torch.float32)[:, None])
        self.memory_r.append(float(reward))
        super().tell(choice, reward)
        if self.told >= self.num_warmup and len(self.memory_r) >= 2:
            self._train()

    def _train(self) -> None:
        s_all = torch.cat(self.memory_s)
        a_all = torch.cat(self.memory_a)
        r = torch.tensor(self.memory_r, dtype=torch.float64)
        z = ((r - r.mean()) / r.std().clamp_min(1e-12)).float()
        r_all = torch.cat([torch.full((len(s),), float(z[i])) for i, s in enumerate(self.memory_s)])[:, None]
        n = len(s_all)
        for _ in range(min(self.problem.layers, 64)):
            idx = torch.tensor([self.rng.randrange(n) for _ in range(min(self.batch, n))])
            s, a, y = s_all[idx], a_all[idx], r_all[idx]
            q = self.critic(torch.cat([s, a], dim=1))
            loss_c = nn.functional.mse_loss(q, y)
            self.opt_critic.zero_grad()
            loss_c.backward()
            self.opt_critic.step()
            loss_a = -self.critic(torch.cat([s, self.actor(s)], dim=1)).mean()
            self.opt_actor.zero_grad()
            loss_a.backward()
            self.opt_actor.step()


AGENTS: dict[str, Callable[..., Agent]] = {"rl": DDPGAgent, "evolutionary": EvolutionaryAgent, "greedy": GreedyAgent,
                                           "random": RandomAgent}  # fmt: skip
ALIASES = {"msquantrl": "rl", "quantrl": "rl", "ddpg": "rl", "ea": "evolutionary", "quantea": "evolutionary",
           "knapsack": "greedy"}  # fmt: skip


def agent_name(name: str) -> str:
    """The registered agent ``name`` means (the seed's ``MsQuantRL`` is ``rl``); unknown names list the valid ones."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in AGENTS:
        raise SlimquantError(f"unknown search algorithm {name!r}; valid: {', '.join(AGENTS)} (MsQuantRL / DDPG = rl)")
    return key


def make_agent(name: str, problem: Problem, seed: int = 0, num_warmup: int = 10, max_episode: int = 100) -> Agent:
    return AGENTS[agent_name(name)](problem, seed=seed, num_warmup=num_warmup, max_episode=max_episode)
