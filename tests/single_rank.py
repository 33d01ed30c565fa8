"""vLLM's distributed state for one process (world size 1, gloo): enough to build the model in
the test process itself, outside an engine."""

import functools
import tempfile


@functools.cache
def init_single_rank() -> None:
    """Once per process; call inside ``set_current_vllm_config``."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        distributed_init_method=f"file://{tempfile.mktemp()}",
        backend="gloo",
    )
    initialize_model_parallel(1, 1)
