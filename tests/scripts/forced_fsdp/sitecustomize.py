"""Run accelerate's FSDP preparation on CPU processes (put this folder on ``PYTHONPATH`` of a launch, tests only).

accelerate applies an FSDP config on GPU backends only: on CPU the state stays ``MULTI_CPU`` and the plugin is
dropped. This makes ``MULTI_CPU`` with an FSDP plugin ``FSDP``, as on GPUs, so a launch with
``examples/accelerate/fsdp.yaml`` runs the same preparation (``fully_shard`` over gloo) a GPU user's would.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and "RANK" in os.environ:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _forced_init(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = _forced_init
