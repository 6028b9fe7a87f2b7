"""What the framework asks of a network, declared in one place.

A network the framework constrains and certifies is a ``LipschitzNetwork``: the ``WeightConstraint``
callback finds its weights through ``param_specs()`` and logs ``layer_norms()`` and
``certified_bound()`` at every validation; the certified-margin loss asks ``logit_l2_bound()`` every
step; checkpoints store ``config_dict()`` to rebuild it. A language model is a ``LanguageNetwork``
on top. ``models.MLP``, ``models.ViT`` and ``models.GPT`` implement them; a plain ``nn.Sequential`` of linear layers
and activations of known slope implements none and needs none: ``PlainNetwork`` reads the same
answers off its layers. Pure torch.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lipschitz_lightning.core.bounds import GELU_MAX_SLOPE, head_row_distances, rms_norm, rms_norm_on_device
from lipschitz_lightning.core.losses import CrossEntropy, LossCounts
from lipschitz_lightning.core.roles import ParamSpec, Role


@runtime_checkable
class LipschitzNetwork(Protocol):
    """A network with a certified Lipschitz bound in the SPEC's units (RMS->RMS, SPEC §2, §7)."""

    def param_specs(self) -> list[ParamSpec]:
        """Every weight the constraint and the optimizer treat by role: its name in the bound
        (``layers.0``, ``q3``, ``embed``), the parameter, its role (hidden matrix, head, embedding) and
        its target norm (SPEC §5). A parameter left out is neither constrained nor in the bound."""

    def layer_norms(self) -> dict[str, float]:
        """The exact norm of every weight under its ``param_specs`` name (RMS->RMS for a matrix, the
        largest token RMS for an embedding), computed in float64 from the weights as they are."""

    def certified_bound(self, norms: dict[str, float] | None = None) -> float:
        """An upper bound on the Lipschitz constant of the logits in the input, RMS->RMS, from
        ``norms`` (default: ``layer_norms()``): ``rms(f(x) - f(y)) <= bound * rms(x - y)`` for every
        pair of inputs of the domain the network documents."""

    def logit_l2_bound(self, radius: float) -> Tensor:
        """The bound in l2 units (``||f(x) - f(y)||_2 <= L ||x - y||_2``) that a certified margin at
        ``radius`` needs, as a 0-d tensor on the weights' device computed without a host sync (the
        margin loss asks every step)."""

    def config_dict(self) -> dict:
        """The constructor's arguments: a checkpoint stores them to rebuild the network."""


@runtime_checkable
class PairwiseCertificate(Protocol):
    """A classifier whose bound is known per pair of classes (its head's rows apart): never looser
    than ``sqrt(2) * logit_l2_bound``, and what ``certify``, the validation's ``certified_acc`` and the
    margin loss use where a network has it (docs/certified_training.md)."""

    def pairwise_l2_bound(self, radius: float = 0.0) -> Tensor:
        """``(classes, classes)``: ``K[y, j]`` bounds how far ``f_y - f_j`` moves per unit l2 of the input,
        a float64 tensor on the weights' device, computed without a host sync."""


@runtime_checkable
class NextTokenModel(Protocol):
    """A language model whose loss takes the head itself, over the vocabulary in chunks, so that no
    step holds every position's logits (``models.gpt.GPT``)."""

    def window(self, progress: float, device: torch.device) -> Tensor | None:
        """The sliding attention window at a fraction ``progress`` of training (None: causal)."""

    def features(self, tokens: Tensor, stats: dict | None = None, window: Tensor | int | None = None) -> Tensor:
        """The last block's output; ``stats`` collects the largest activations and attention logits."""

    def next_token_loss(self, features: Tensor, targets: Tensor, chunk: int, loss: CrossEntropy | None,
                        margin: Tensor | None) -> LossCounts:
        """The head's mean loss over every position, taken ``chunk`` positions at a time."""


@runtime_checkable
class ClipsAttentionLogits(Protocol):
    """A model with Kimi's QK-clip: after every step, heads whose logits passed ``logit_clip`` shrink
    their q and k (``models.gpt.GPT.clip_logits``; None: off)."""

    logit_clip: float | None

    def clip_logits(self, stats: dict) -> None:
        """Shrink the q and k of every head whose largest |logit| in ``stats`` passed ``logit_clip``."""


# ---------------------------------------------------------------------------- a user's plain network

# The largest slope of each activation this project can certify through (the Lipschitz constant of
# the elementwise map; ``rms(act(a) - act(b)) <= slope * rms(a - b)``). Shape changes that keep every
# entry (Flatten) and what is the identity at evaluation (Dropout) have slope 1.
SLOPES: dict[type, float] = {
    nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Tanh: 1.0, nn.Hardtanh: 1.0, nn.Softsign: 1.0, nn.Sigmoid: 0.25,
    nn.Identity: 1.0, nn.Flatten: 1.0, nn.Dropout: 1.0,
}


def activation_slope(module: nn.Module) -> float | None:
    """``module``'s Lipschitz constant as an elementwise map, or None where this project knows none."""
    if type(module) in SLOPES:
        return SLOPES[type(module)]
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.GELU):
        return GELU_MAX_SLOPE["tanh" if module.approximate == "tanh" else "exact"]
    slope = getattr(module, "lipschitz_constant", None)  # an activation of the user's that declares it (MaxMin)
    return float(slope) if slope is not None else None


class NotCertifiable(ValueError):
    """A network this project cannot bound: the message names the first layer it cannot read."""


class PlainNetwork:
    """A user's ``nn.Sequential`` of ``nn.Linear`` layers (biases allowed: a shift changes no
    difference) and activations of known slope (``activation_slope``), read as a ``LipschitzNetwork``:
    its bound is the product of the layers' RMS->RMS norms and the activations' slopes. Nested
    Sequentials are walked in order. Anything else raises ``NotCertifiable`` naming it."""

    def __init__(self, net: nn.Module):
        if not isinstance(net, nn.Sequential):
            raise NotCertifiable(f"{type(net).__name__} is not an nn.Sequential: give it param_specs(), layer_norms() and "
                                 f"certified_bound() (models.protocol.LipschitzNetwork)")
        self.net = net
        self.layers: list[tuple[str, nn.Linear]] = []
        self.slope = 1.0
        self.ends_with_linear = False  # the logits are a linear layer's outputs: the per-pair bound applies
        for name, module in _leaves(net):
            self.ends_with_linear = isinstance(module, nn.Linear)
            if isinstance(module, nn.Linear):
                self.layers.append((name, module))
                continue
            slope = activation_slope(module)
            if slope is None:
                raise NotCertifiable(f"{name} ({type(module).__name__}) has no known Lipschitz constant: a plain network "
                                     f"certifies through nn.Linear and {', '.join(sorted(t.__name__ for t in SLOPES))}, "
                                     f"LeakyReLU, GELU, or a module with a lipschitz_constant attribute")
            self.slope *= slope
        if not self.layers:
            raise NotCertifiable(f"{type(net).__name__} holds no nn.Linear layer to bound")

    def param_specs(self) -> list[ParamSpec]:
        return [ParamSpec(name, layer.weight, Role.HIDDEN, 1.0) for name, layer in self.layers]

    def layer_norms(self) -> dict[str, float]:
        return {name: rms_norm(layer.weight) for name, layer in self.layers}

    def certified_bound(self, norms: dict[str, float] | None = None) -> float:
        norms = norms if norms is not None else self.layer_norms()
        return self.slope * math.prod(norms.values())

    def logit_l2_bound(self, radius: float = 0.0) -> Tensor:
        """RMS->RMS times ``sqrt(outputs / inputs)`` (robustness/certified.py): it holds for every pair."""
        bound = self.slope * math.prod(rms_norm_on_device(layer.weight) for _, layer in self.layers)
        return bound * math.sqrt(self.layers[-1][1].out_features / self.layers[0][1].in_features)

    def pairwise_l2_bound(self, radius: float = 0.0) -> Tensor:
        """The head's rows apart times the l2 bound below it (``models.mlp.MLP.pairwise_l2_bound``); the
        last layer's bias shifts a logit difference and never stretches it."""
        *below, head = [layer for _, layer in self.layers]
        if not self.ends_with_linear:  # an activation after the head: every pair gets the global bound
            return math.sqrt(2) * self.logit_l2_bound() * (1 - torch.eye(head.out_features, dtype=torch.float64,
                                                                               device=head.weight.device))
        bound = self.slope * math.prod(rms_norm_on_device(layer.weight) for layer in below)
        return head_row_distances(head.weight) * bound * math.sqrt(head.in_features / self.layers[0][1].in_features)

    def config_dict(self) -> dict:
        raise NotCertifiable("a plain network has no constructor arguments to store: save its state_dict")


def _leaves(module: nn.Module, prefix: str = ""):
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path + ".")
        else:
            yield path, child


def lipschitz_network(net: nn.Module) -> LipschitzNetwork:
    """``net`` itself where it declares the protocol, else ``PlainNetwork(net)`` (which raises
    ``NotCertifiable`` naming what it cannot read)."""
    return net if isinstance(net, LipschitzNetwork) else PlainNetwork(net)
