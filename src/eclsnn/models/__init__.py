"""The model zoo: ``create(name, num_classes, ...)`` builds any registered network, ready for
training with the learnable threshold clip and for conversion to a spiking network.

Models: ``cnn-fmnist`` (small Fashion-MNIST CNN), ``vgg16``, ``resnet18``, ``resnet20``,
``resnet34``; :func:`list_models` is the authority. Every model follows the same rules so that the
converter can trace it with ``torch.fx``: one activation module per layer (made by
:func:`make_activation`), conv → BatchNorm → activation, residual additions before the block's last
activation, average pooling unless ``pool="max"``, and a plain ``nn.Linear`` readout at the end.
"""

from . import cnn, resnet, vgg  # noqa: F401  (importing registers the models)
from .layers import ACTIVATIONS, POOLS, make_activation, make_pool
from .registry import MODEL_DEFAULTS, create, input_size, list_models, register

__all__ = [
    "create",
    "list_models",
    "register",
    "make_activation",
    "make_pool",
    "input_size",
    "MODEL_DEFAULTS",
    "ACTIVATIONS",
    "POOLS",
]
