"""The MLP of the paper's CIFAR-10 warmups (SPEC §8): no biases, ReLU (or MaxMin), every layer constrained."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import annotated_types as at
import torch
from torch import Tensor, nn

from lipschitz_lightning.core.bounds import head_row_distances, mlp_bound, rms_norm, rms_norm_on_device
from lipschitz_lightning.core.roles import ParamSpec, Role, mlp_target_norms
from lipschitz_lightning.core.types import Positive, PositiveInt


def relu(x: Tensor) -> Tensor:
    # torch.maximum gives slope 1/2 at exactly 0, as JAX's does; torch.relu gives 0 there. With
    # zero_init the first layer's outputs are all exactly 0, so with torch.relu no gradient would
    # ever reach any layer and the network could not start training.
    return torch.maximum(x, x.new_zeros(()))


def maxmin(x: Tensor) -> Tensor:
    """MaxMin (GroupSort of pairs, Anil et al. 2019): each pair of features ``(a, b)`` becomes
    ``(max(a, b), min(a, b))``. A permutation of the pair wherever it is differentiable, so it is
    1-Lipschitz in l2 (and RMS) and keeps the gradient's norm, where ReLU drops every negative
    coordinate's. (torch.maximum and torch.minimum split the gradient of a tie: with zero_init the
    first layer's outputs are all 0, and training must still start.)"""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((torch.maximum(a, b), torch.minimum(a, b)), dim=-1).flatten(-2)


ACTIVATIONS = {"relu": relu, "maxmin": maxmin}


class MaxMin(nn.Module):
    """``maxmin`` as a module, for a network of the user's own (``models.protocol.PlainNetwork`` reads
    its ``lipschitz_constant``)."""

    lipschitz_constant = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return maxmin(x)


class MLP(nn.Module):
    def __init__(
        self,
        input_dim: PositiveInt = 3072,
        width: PositiveInt = 256,
        num_layers: Annotated[int, at.Ge(2)] = 3,
        num_classes: PositiveInt = 10,
        zero_init: bool = True,
        final_scale: Positive = 1.0,
        input_shift: Annotated[float, at.Interval(ge=0, le=1)] = 0.0,
        activation: Literal[tuple(ACTIVATIONS)] = "relu",
    ):
        super().__init__()
        self.config = dict(input_dim=input_dim, width=width, num_layers=num_layers, num_classes=num_classes,
                           zero_init=zero_init, final_scale=final_scale, input_shift=input_shift, activation=activation)
        # 1-Lipschitz both (MaxMin pairs the features: an even width, checked with the settings)
        self.activation = ACTIVATIONS[activation]
        # subtracted from every input value (0.5 centres pixels in [0, 1]): a network without biases
        # cannot make the offset itself. A translation, so the bound and every certified radius are unchanged.
        self.input_shift = input_shift
        dims = [input_dim] + [width] * (num_layers - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in zip(dims[:-1], dims[1:]))
        self.final_scale = final_scale
        with torch.no_grad():
            for layer in self.layers:
                # orth(normal) * scale: every singular value sqrt(fanout/fanin), i.e. RMS->RMS norm 1
                nn.init.orthogonal_(layer.weight)
                layer.weight.mul_(math.sqrt(layer.out_features / layer.in_features))
            if zero_init:
                self.layers[0].weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if self.input_shift:
            x = x - self.input_shift
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x) * self.final_scale

    def param_specs(self) -> list[ParamSpec]:
        targets = mlp_target_norms(len(self.layers))
        last = len(self.layers) - 1
        return [
            ParamSpec(f"layers.{i}.weight", layer.weight, Role.HEAD if i == last else Role.HIDDEN, t)
            for i, (layer, t) in enumerate(zip(self.layers, targets))
        ]

    def layer_norms(self) -> dict[str, float]:
        """Exact RMS->RMS norm of every layer, input first."""
        return {f"layers.{i}": rms_norm(layer.weight) for i, layer in enumerate(self.layers)}

    def certified_bound(self, norms: dict[str, float] | None = None) -> float:
        """Lipschitz bound of the logits w.r.t. the flattened pixels, both in RMS units."""
        return mlp_bound(norms if norms is not None else self.layer_norms(), self.final_scale)

    def logit_l2_bound(self, radius: float = 0.0) -> torch.Tensor:
        """The bound in plain l2 units, ``||f(x) - f(y)||_2 <= L ||x - y||_2`` over the flattened
        pixels: the RMS one times ``sqrt(classes / inputs)`` (robustness/certified.py derives it).
        It holds for every pair of inputs, so a certified margin at any ``radius`` uses the same one.
        A 0-d tensor on the weights' device, computed without waiting for it (the margin loss asks
        every step)."""
        norms = [rms_norm_on_device(layer.weight) for layer in self.layers]
        return mlp_bound(dict(enumerate(norms)), self.final_scale) * math.sqrt(self.config["num_classes"] / self.config["input_dim"])

    def pairwise_l2_bound(self, radius: float = 0.0) -> torch.Tensor:
        """``K[y, j]`` with ``|(f_y - f_j)(a) - (f_y - f_j)(b)| <= K[y, j] ||a - b||_2`` for every pair of
        inputs (flattened pixels): ``|c| ||W_y - W_j||_2`` of the head's rows times the l2 bound of the
        layers below, ``prod ||W_i||_rms * sqrt(width / inputs)`` (docs/certified_training.md). Never
        above ``sqrt(2) * logit_l2_bound()``; a ``(classes, classes)`` float64 tensor on the weights'
        device, computed without waiting for it (the margin loss asks every step)."""
        head = self.layers[-1].weight
        below = math.prod(rms_norm_on_device(layer.weight) for layer in self.layers[:-1])
        return abs(self.final_scale) * head_row_distances(head) * below * math.sqrt(head.shape[1] / self.config["input_dim"])

    def config_dict(self) -> dict:
        return dict(self.config)
