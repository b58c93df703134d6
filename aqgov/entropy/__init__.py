"""Entropy metrics, profiles (`PROFILE` documents), enforcement inside the step, and signed overrides
(`OVERRIDE` documents)."""

from aqgov.entropy._enforce import (
  EnforceState,
  Event,
  Events,
  check_escalation,
  decode_events,
  enforce,
  enforce_state,
  route_weights,
)
from aqgov.entropy._metrics import (
  METRICS,
  attention_entropy,
  effective_rank,
  expert_utilisation,
  flatten,
  from_linen,
  from_nnx,
  gradient_entropy,
  measure,
  renyi2,
)
from aqgov.entropy._overrides import (
  OVERRIDE,
  Override,
  admit_override,
  host_mask,
)
from aqgov.entropy._profile import (
  PROFILE,
  Bound,
  EntropyProfile,
  Representation,
)

__all__ = [
  "admit_override",
  "attention_entropy",
  "Bound",
  "check_escalation",
  "decode_events",
  "effective_rank",
  "enforce",
  "enforce_state",
  "EnforceState",
  "EntropyProfile",
  "expert_utilisation",
  "Event",
  "Events",
  "flatten",
  "from_linen",
  "from_nnx",
  "gradient_entropy",
  "host_mask",
  "measure",
  "METRICS",
  "Override",
  "OVERRIDE",
  "PROFILE",
  "renyi2",
  "Representation",
  "route_weights",
]
