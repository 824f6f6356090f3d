"""Names of converted variants (neuron settings), one scheme for every recipe."""

from __future__ import annotations

from typing import Any

__all__ = ["variant_name", "DEMO_VARIANTS"]


def variant_name(neuron: str, v_init: float, theta_neg: float = 0.0, show_theta_neg: bool = False) -> str:
    """A short label: ``if-v0``, ``dual-v0.5``, ``dual-v0.5-neg-0.5`` (θ_neg in units of θ; shown for a
    dual neuron when it is not 0, or always with ``show_theta_neg`` — the ablation's θ_neg sweep)."""
    name = f"{neuron}-v{v_init:g}"
    return name + (f"-neg{theta_neg:g}" if neuron == "dual" and (theta_neg != 0 or show_theta_neg) else "")


#: The three variants of the demo and of ``eclsnn analyze`` without neuron flags: the plain IF neuron,
#: IF with θ/2 start, the dual-threshold neuron. The keys are the demo's table labels (kept since 0.1.0:
#: results and docs name them); ``analyze`` labels them with :func:`variant_name`.
DEMO_VARIANTS: dict[str, dict[str, Any]] = {
    "if-v0": {"neuron": "if", "v_init": 0.0},
    "if-half": {"neuron": "if", "v_init": 0.5},
    "dual": {"neuron": "dual", "v_init": 0.5},
}
