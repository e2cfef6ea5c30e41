"""Linear probes on a frozen vision tower: how well do the image tokens LLaVA's projector reads separate an attribute?

A VL task can only be learned if the tower's features carry what it asks about. For each attribute (a shape's
colour, kind or size, how many shapes there are, where a shape is, where one shape is relative to another) this
draws fresh scenes with the synthetic world's own layout functions, takes the tower's selected-layer patch tokens
and fits a ridge-regression classifier to one-hot labels (the standard closed-form linear probe), or a multinomial
logistic regression (slower; fairer to an ordered attribute such as count), with the penalty chosen on a
validation split. Two read-outs of the tokens:

* `flat`: all tokens side by side, exactly what the projector sees; a token's slot tells the probe where it is;
* `mean`: the tokens averaged, so only what their *content* says counts, which is what an LLM that reads the
  image tokens as a bag (attention without a sense of where a token came from) can use.

Test accuracy far above chance means a linear read-out exists. `control` keeps the colour scenes but draws its
label independently of the image, so every probe must stay at chance on it: the check that a high score is not
the probe memorising its training set.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from mllm_cl.data import preprocess_image
from mllm_cl.metrics import wilson_interval
from mllm_cl.synthetic.images import COLOURS, SHAPES, render
from mllm_cl.synthetic.world import RELATIONS, TASKS, Scene, other_than, random_shape, spatial_pair
from mllm_cl.vision import VisionTower

CELLS = tuple(f"{row} {column}" for row in ("top", "middle", "bottom") for column in ("left", "centre", "right"))


def _colour(label: str, rng: random.Random) -> Scene:
    return [random_shape(rng, colour=label)]


def _kind(label: str, rng: random.Random) -> Scene:
    return [random_shape(rng, kind=label)]


def _position(label: str, rng: random.Random) -> Scene:
    """One small shape in the named cell of a 3x3 grid."""
    cell = CELLS.index(label)
    shape = random_shape(rng, size="small")
    return [replace(shape, x=(cell % 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06),
                    y=(cell // 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06))]


def _relation(label: str, rng: random.Random) -> Scene:
    """Two shapes; the label is where the red one is relative to the other (the spatial task's question)."""
    first, second = spatial_pair(label, rng)
    return [replace(first, colour="red"), replace(second, colour=other_than(COLOURS, "red", rng))]


def _control(label: str, rng: random.Random) -> Scene:
    """A colour scene whose label says nothing about it."""
    return [random_shape(rng)]


def _task_scene(task: str) -> Callable[[str, random.Random], Scene]:
    return lambda label, rng: TASKS[task][1](label, rng)[0]


ATTRIBUTES: dict[str, tuple[tuple[str, ...], Callable[[str, random.Random], Scene]]] = {
    "colour": (tuple(COLOURS), _colour),
    "kind": (SHAPES, _kind),
    "size": (TASKS["size"][0], _task_scene("size")),
    "count": (TASKS["count"][0], _task_scene("count")),
    "big colour": (TASKS["big_color"][0], _task_scene("big_color")),
    "position": (CELLS, _position),
    "relation": (tuple(RELATIONS), _relation),
    "control": (tuple(COLOURS), _control),
}


@dataclass(frozen=True)
class ProbeResult:
    attribute: str
    accuracy: float  # percent, on the test split
    interval: tuple[float, float]  # 95% Wilson, percent
    chance: float  # percent: 100 / number of classes (labels are balanced)
    ridge: float  # the chosen penalty: ridge strength relative to the mean squared feature norm, or logistic L2
    n_test: int


def draw(attribute: str, n: int, seed: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` balanced (pixels (n, 3, S, S), labels (n,)) for one attribute, deterministic in `seed`."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")
    classes, make = ATTRIBUTES[attribute]
    rng = random.Random(f"probe:{seed}:{attribute}")
    labels = [i % len(classes) for i in range(n)]
    rng.shuffle(labels)
    pixels = [preprocess_image(render(make(classes[y], rng), image_size), image_size) for y in labels]
    return torch.stack(pixels), torch.tensor(labels)


@torch.no_grad()
def tower_features(tower: VisionTower | None, pixels: torch.Tensor, pool: str = "flat",
                   batch_size: int = 128) -> torch.Tensor:
    """The tokens the projector reads, (n, num_image_tokens * d) flattened (`flat`: a slot's position is free to
    the probe) or (n, d) averaged over tokens (`mean`: only what the tokens' content says, as an attention
    read-out sees it); the raw pixels when `tower` is None."""
    if tower is None:
        tokens = pixels.flatten(2).transpose(1, 2)  # (n, H*W, 3): one "token" per pixel
    else:
        tower.eval()
        tokens = torch.cat([tower(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    if pool not in ("flat", "mean"):
        raise ValueError(f"pool must be 'flat' or 'mean', got {pool!r}")
    return (tokens.flatten(1) if pool == "flat" else tokens.mean(1)).double()


def ridge_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, ridge: float) -> torch.Tensor:
    """Weights W (d+1, k) minimising |[x 1] W - onehot(y)|^2 + ridge * mean|x|^2 * |W_x|^2, through the n x n dual
    system (features outnumber samples); the bias column is left unpenalised by centring."""
    targets = torch.nn.functional.one_hot(y, num_classes).double()
    x_mean, t_mean = x.mean(0), targets.mean(0)
    xc, tc = x - x_mean, targets - t_mean
    gram = xc @ xc.T
    scale = gram.diagonal().mean()
    dual = torch.linalg.solve(gram + ridge * scale * torch.eye(len(x), dtype=x.dtype), tc)
    weights = xc.T @ dual  # (d, k)
    bias = t_mean - x_mean @ weights
    return torch.cat([weights, bias[None]])


def logistic_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, penalty: float,
                 max_iter: int = 300) -> torch.Tensor:
    """Weights W (d+1, k) of multinomial logistic regression: minimise the mean cross-entropy of [z 1] W_z plus
    penalty * |W_z|^2 over standardised features z = (x - mean) / std, by L-BFGS; returned folded back onto x, so
    `ridge_predict` scores it. Unlike the ridge probe's least squares to one-hot targets, it can carve an
    ordered attribute (a count read off one direction) into intervals."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    weights = torch.zeros(x.shape[1] + 1, num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weights[:-1] + weights[-1], y) + \
            penalty * weights[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    w = weights.detach()
    folded = w[:-1] / std[:, None]
    return torch.cat([folded, (w[-1] - mean @ folded)[None]])


def ridge_predict(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The class of each row under affine class scores [x 1] W (a ridge or a logistic probe's weights)."""
    return (x @ weights[:-1] + weights[-1]).argmax(1)


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
PROBES: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor], tuple[float, ...]]] = {
    "ridge": (ridge_fit, RIDGES),  # closed form: fast, the default
    "logistic": (logistic_fit, (1e-4, 1e-3, 1e-2)),  # iterative: slower, fairer to ordered attributes
}


def fit_and_score(x: torch.Tensor, labels: torch.Tensor, num_classes: int, n_train: int,
                  n_val: int, probe: str = "ridge") -> tuple[int, float]:
    """Fit on the first `n_train` rows, choose the penalty on the next `n_val`, refit on both and score the rest:
    (number correct, chosen penalty). `probe`: a key of PROBES."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; known: {', '.join(PROBES)}")
    fit_probe, penalties = PROBES[probe]
    fit, val = slice(0, n_train), slice(n_train, n_train + n_val)

    def val_accuracy(penalty: float) -> float:
        weights = fit_probe(x[fit], labels[fit], num_classes, penalty)
        return (ridge_predict(weights, x[val]) == labels[val]).double().mean().item()

    best = max(penalties, key=val_accuracy)
    train_val, test = slice(0, n_train + n_val), slice(n_train + n_val, None)
    weights = fit_probe(x[train_val], labels[train_val], num_classes, best)
    return int((ridge_predict(weights, x[test]) == labels[test]).sum()), best


def probe_towers(towers: dict[str, VisionTower | None], attributes: tuple[str, ...] = tuple(ATTRIBUTES),
                 pools: tuple[str, ...] = ("flat", "mean"), n_train: int = 600, n_val: int = 200, n_test: int = 400,
                 seed: int = 0, image_size: int = 64, probe: str = "ridge") -> dict[str, list[ProbeResult]]:
    """{"<tower name> (<pool>)": one ProbeResult per attribute}; every tower sees the same scenes (a tower of
    None: the raw pixels). `probe`: "ridge" or "logistic" (PROBES)."""
    columns: dict[str, list[ProbeResult]] = {f"{name} ({pool})": [] for name in towers for pool in pools}
    for attribute in attributes:
        classes = ATTRIBUTES[attribute][0]
        pixels, labels = draw(attribute, n_train + n_val + n_test, seed, image_size)
        if attribute == "control":
            labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
        for name, tower in towers.items():
            for pool in pools:
                correct, ridge = fit_and_score(tower_features(tower, pixels, pool), labels, len(classes), n_train,
                                               n_val, probe)
                columns[f"{name} ({pool})"].append(ProbeResult(
                    attribute, 100.0 * correct / n_test, wilson_interval(correct, n_test), 100.0 / len(classes),
                    ridge, n_test))
    return columns


def format_table(columns: dict[str, list[ProbeResult]]) -> str:
    """A markdown table: one row per attribute, one column per feature source (accuracy [95% CI])."""
    names = list(columns)
    rows = ["| attribute | chance | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for i, first in enumerate(columns[names[0]]):
        cells = [f"{r.accuracy:.1f} [{r.interval[0]:.1f}, {r.interval[1]:.1f}]"
                 for r in (columns[name][i] for name in names)]
        rows.append(f"| {first.attribute} | {first.chance:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
