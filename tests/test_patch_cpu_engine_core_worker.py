"""patches/patch_cpu_engine_core_worker.py: with vLLM's default
``VLLM_ENABLE_V1_MULTIPROCESSING=1``, an engine of this plugin's model with one worker starts one
process (the engine core, which runs the worker), that process starts with the OpenMP binding
vLLM's own layout gives its worker process, its ZMQ threads run on the CPUs they have in vLLM's
layout, and the answers are transformers'. ``VLLM_ERNIE_MOE_WORKER_IN_ENGINE_CORE=0`` is vLLM's
layout, the reference: two processes.
"""

import os

import pytest
from child_engine import answers, engine_report, vllm_processes
from reference import check_logprobs_close, transformers_greedy
from settings import ONE_PROCESS

from vllm_ernie_moe.envs import WORKER_IN_ENGINE_CORE_VARIABLE
from vllm_ernie_moe.patches import patch_cpu_engine_core_worker

MAX_TOKENS, TOP_K = 8, 5
pytestmark = pytest.mark.skipif(
    not patch_cpu_engine_core_worker.apply(), reason="vLLM's CPU platform keeps one worker in place"
)


@pytest.fixture(scope="module")
def reports(checkpoint):
    """(checkpoint, the plugin's layout, vLLM's layout): fresh processes' engines."""
    path = checkpoint("tiny-21b", "bfloat16")
    layouts = [
        engine_report(
            path, {ONE_PROCESS: "1", WORKER_IN_ENGINE_CORE_VARIABLE: on}, MAX_TOKENS, TOP_K
        )
        for on in ("1", "0")
    ]
    return path, *layouts


def test_one_worker_runs_in_the_engine_core_process(reports):
    _, patched, vllms = reports
    assert len(vllm_processes(vllms)) == 2  # engine core and worker: what the patch changes
    assert len(vllm_processes(patched)) == 1


@pytest.fixture
def bound_layouts(reports) -> tuple[dict, dict, dict]:
    """(the plugin's engine core, vLLM's engine core, vLLM's worker) where vLLM binds threads."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
        pytest.skip("VLLM_CPU_OMP_THREADS_BIND=nobind: vLLM binds no process")
    _, patched, vllms = reports
    (engine_core,) = vllm_processes(patched)
    first, second = vllm_processes(vllms)
    # vLLM's worker is its engine core's child.
    vllm_engine_core, vllm_worker = (
        (first, second) if second["parent"] == first["pid"] else (second, first)
    )
    assert vllm_worker["parent"] == vllm_engine_core["pid"]
    return engine_core, vllm_engine_core, vllm_worker


def test_the_engine_core_starts_with_the_binding_vllm_gives_its_worker(bound_layouts):
    engine_core, _, vllm_worker = bound_layouts
    assert vllm_worker["binding"], "vLLM's worker process started without an OpenMP binding"
    assert engine_core["binding"] == vllm_worker["binding"]


def test_the_engine_cores_zmq_threads_run_where_they_do_in_vllms_layout(bound_layouts):
    engine_core, vllm_engine_core, _ = bound_layouts

    def zmq_cpus(process: dict) -> set[str]:
        return {cpus for name, cpus in process["threads"] if name.startswith("ZMQbg")}

    assert zmq_cpus(engine_core), "the engine core runs no ZMQ thread"
    # Bound, they would share the first OpenMP thread's core with it.
    assert zmq_cpus(engine_core) == zmq_cpus(vllm_engine_core)


def test_both_layouts_answer_as_transformers_does(reports):
    path, patched, vllms = reports
    reference = transformers_greedy(path, "bfloat16", MAX_TOKENS, TOP_K)
    check_logprobs_close(reference, answers(patched))
    check_logprobs_close(reference, answers(vllms))


def test_only_one_worker_of_this_model_moves_unless_turned_off(checkpoint, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    path = str(checkpoint("tiny-21b", "bfloat16"))

    def config(**settings):
        return EngineArgs(model=path, max_model_len=512, **settings).create_engine_config()

    def backend(**settings) -> str:
        return config(**settings).parallel_config.distributed_executor_backend

    monkeypatch.setenv(ONE_PROCESS, "1")
    monkeypatch.delenv(WORKER_IN_ENGINE_CORE_VARIABLE, raising=False)
    assert backend() == "uni"  # the patch, by default; vLLM's platform says "mp"
    assert backend(distributed_executor_backend="mp") == "mp"
    assert backend(tensor_parallel_size=2) == "mp"
    another_model = config()
    another_model.model_config.hf_config.architectures = ["LlamaForCausalLM"]
    another_model.parallel_config.distributed_executor_backend = "uni"
    current_platform.check_and_update_config(another_model)
    assert another_model.parallel_config.distributed_executor_backend == "mp"
    monkeypatch.setenv(WORKER_IN_ENGINE_CORE_VARIABLE, "0")
    assert backend() == "mp"
