"""analysis: per-layer error decomposition (decomposition), operation and energy counts (counting),
reports (report)."""

from eclsnn.analysis.counting import E_AC_PJ, E_MAC_PJ, fanout_map, synapse_kinds
from eclsnn.analysis.decomposition import ERRORS, analyze, layer_errors, quantized_reference
from eclsnn.analysis.report import format_analysis, plot_analysis

__all__ = ["E_AC_PJ", "E_MAC_PJ", "ERRORS", "analyze", "layer_errors", "quantized_reference", "fanout_map",
           "synapse_kinds", "format_analysis", "plot_analysis"]
