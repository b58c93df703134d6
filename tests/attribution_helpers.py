"""A tiny governed run that records gradient sketches (a checkpoint after every step)."""

from aqgov.documents._keys import TrustStore
from aqgov.examples import sample
from aqgov.examples.demo import create_authorities
from aqgov.lineage import GovernedRun

CONFIG = {
  "seq_len": 16,
  "d_model": 16,
  "num_heads": 4,
  "num_blocks": 1,
  "adapter_dim": 4,
  "seed": 0,
  "sketch_dim": 64,
  "sketch_seed": 11,
}
STEPS = 3


def make_sketched_run(root, config=CONFIG):
  """(run dir, trust, authorities) of a closed 3-step run over the first 8 sample examples."""
  authorities = create_authorities(root / "authorities")
  run = GovernedRun.start(
    root / "run",
    task="aqgov.examples.tiny_lm:make_task",
    task_config=config,
    policies=authorities.policies,
    profiles=[authorities.profile],
    manifests=authorities.manifests,
    trust=authorities.public_keys,
    checkpoint_every=1,
  )
  examples = sample.examples()[:8]
  for _ in range(STEPS):
    run.step(examples)
  run.close()
  trust = TrustStore.from_paths(sorted((root / "run" / "keys").glob("*.pub")))
  return root / "run", trust, authorities
