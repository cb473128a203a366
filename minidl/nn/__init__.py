"""minidl.nn: layers as Modules (parameters + forward), mirroring torch.nn."""
from .module import Module, ModuleDict, ModuleList, Parameter, Sequential
from . import init
