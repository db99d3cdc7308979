"""Growth events during training: the controller the trainer calls (controller.py), one event
as named steps (event.py), and its compute (compute.py). The methods and the mathematics they
run are in growrun.growth."""
from growrun.train.events.controller import GrowthController

__all__ = ["GrowthController"]
