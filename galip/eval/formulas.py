"""How the summary metrics are made, in the names a user sees. The gate's description in the registry
quotes these; they live apart from the metric implementations so that the register stage and the flow
can quote them without importing torch and torchmetrics (seconds per process)."""

from __future__ import annotations

SUMMARY_FORMULAS = {
    "prompt_fidelity": "prompt_fidelity = 0.5 * prompt_fidelity_held_in_attr_mean + 0.5 * prompt_fidelity_held_out_all_attrs",
}
