"""simulation: the spiking network, its executor, running and evaluating it, adaptive latency."""

from eclsnn.simulation.adaptive import calibrate_margin, evaluate_adaptive, simulate_adaptive
from eclsnn.simulation.network import SpikingNetwork, check_time_steps
from eclsnn.simulation.run import evaluate, evaluate_ann, observe_neurons, simulate

__all__ = ["SpikingNetwork", "check_time_steps", "simulate", "evaluate", "evaluate_ann", "observe_neurons",
           "simulate_adaptive", "evaluate_adaptive", "calibrate_margin"]
