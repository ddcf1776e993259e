r"""Neural-network building blocks: Module, Parameter, layers and the GPT."""

from .module import Module, ModuleList, Parameter

__all__ = ["Module", "ModuleList", "Parameter"]
