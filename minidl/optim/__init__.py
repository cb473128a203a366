"""minidl.optim: optimizers (SGD, Adam, AdamW, RMSprop; FlatSGD, FlatAdam, FlatAdamW update
every parameter in one kernel call) and learning-rate schedules."""
from .optimizer import Optimizer
from .sgd import SGD
from .adam import Adam, AdamW
from .rmsprop import RMSprop
from .flat import FlatAdam, FlatAdamW, FlatBuffer, FlatSGD
from . import lr_scheduler
