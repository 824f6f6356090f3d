"""Export to and import from NIR, the Neuromorphic Intermediate Representation (Pedersen et al.,
Nature Communications 2024; the ``nir`` package), keeping the dynamics of eclsnn's neurons.

NIR's own ``IF`` node resets to a value, starts from an unstated potential and fires on ``v > θ``;
eclsnn's neurons reset by subtraction, start from ``v_init·θ`` and fire on ``m ≥ θ``. So the default
form (``neurons="exact"``) writes each neuron layer as a composition of NIR primitives that is exact
for the IF neuron (``docs/NIR.md`` derives it):

- ``<layer>.v``     ``I`` (r = 1): the shifted membrane ``u = v − v_init·θ``, starting from 0;
- ``<layer>.fire``  ``Threshold`` at ``θ·(1 − v_init)``, lowered by one float32 step so that NIR's
  strict ``u > thr`` is eclsnn's ``u ≥ θ·(1 − v_init)`` for every float32 ``u``;
- ``<layer>.reset`` ``Scale(−θ)`` fed back into ``<layer>.v``: a spike at step t removes θ from
  the membrane seen at step t+1 — subtractive reset;
- ``<layer>``       ``Scale(θ)``: the layer's output ``θ·s``.

What NIR has no primitive for — the dual-threshold neuron's negative spikes and its count gate — is
kept in the node metadata (key ``"eclsnn"``), announced by a :class:`NIRExportWarning`, and read back
by :func:`from_nir`; a reader that ignores the metadata runs those layers as IF neurons.
``neurons="if"`` writes NIR ``IF`` nodes instead (what other frameworks read), with θ folded into the
weights that consume the spikes; there subtractive reset, ``v_init`` and the tie rule are metadata only.

``nir`` is imported lazily: ``pip install "eclsnn[nir]"``.
"""


from eclsnn.io._nir_common import FORMAT, META, NEURON_FORMS, NIRExportWarning
from eclsnn.io.nir_export import to_nir, write_nir
from eclsnn.io.nir_import import NIRScale, from_nir, read_nir

__all__ = ["to_nir", "from_nir", "write_nir", "read_nir", "NIRExportWarning", "NEURON_FORMS", "FORMAT", "META", "NIRScale"]
