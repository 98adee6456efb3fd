"""memsweep's Hydra plugins, found by Hydra's plugin scan of the `hydra_plugins` namespace.

- `hydra/launcher=batched` (conf/hydra/launcher/batched.yaml, schema `memsweep_batched`): analytic
  jobs estimated together, one part file per batch; measured jobs one by one.
- `hydra/sweeper=memsweep` (conf/hydra/sweeper/memsweep.yaml, config.yaml's default): Hydra's basic
  sweeper, leaving the check of each job's configuration to a launcher that does it itself.

Kept light (Hydra imports every module here in every Hydra app): the work is in memsweep.app.batched.
"""
