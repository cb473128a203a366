"""minidl.optim: optimizers (SGD, Adam, AdamW, RMSprop) and learning-rate schedules."""
from .optimizer import Optimizer
from .sgd import SGD
from .adam import Adam, AdamW
from .rmsprop import RMSprop
from . import lr_scheduler
