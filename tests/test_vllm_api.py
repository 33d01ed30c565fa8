"""Every vLLM symbol the package imports, and every patch target, in each vLLM release at hand.

Sources: the installed vLLM, and every vLLM wheel in ``settings.vllm_wheel_dir()`` (``make
vllm-wheels`` downloads vLLM 0.33.0, the newest, which has no CPU build to install here). The
wheels are read as zip files: nothing is installed or imported, no GPU needed. API drift shows up
here as a named symbol, not at a user's start-up.
"""

from pathlib import Path

import pytest
import settings
import vllm
from vllm_source import VllmImport, VllmSource, package_imports

from vllm_ernie_moe import compat


def _sources() -> list:
    installed = Path(vllm.__file__).parent
    params = [pytest.param(("installed", installed), id=f"installed-{vllm.__version__}")]
    wheels = sorted(settings.vllm_wheel_dir().glob("vllm*.whl"))
    params += [pytest.param(("wheel", w), id=w.name.split("-cp")[0]) for w in wheels]
    return params


@pytest.fixture(scope="module", params=_sources())
def source(request) -> VllmSource:
    kind, path = request.param
    if kind == "wheel":
        return VllmSource.from_wheel(path)
    return VllmSource.from_directory(path, f"installed vLLM {vllm.__version__}")


def test_the_newest_vllm_is_checked():
    wheels = list(settings.vllm_wheel_dir().glob("vllm-0.33*.whl"))
    if not wheels:
        pytest.skip(f"no vLLM 0.33 wheel in {settings.vllm_wheel_dir()}: run `make vllm-wheels`")


def test_every_vllm_import_of_the_package_resolves(source):
    imports = list(package_imports())
    assert len(imports) > 50  # the model, the patches, the quantization method
    missing = [
        f"{i.where}: from {i.module} import {i.name}" for i in imports if not source.resolves(i)
    ]
    assert missing == [], f"{source.label} lacks: {missing}"


def test_the_checker_finds_a_missing_symbol(source):
    assert not source.resolves(VllmImport("-", "vllm.config", "NoSuchConfig"))
    assert not source.resolves(VllmImport("-", "vllm.no_such_module", None))
    assert source.resolves(VllmImport("-", "vllm", "LLM"))  # a lazy export


def test_cpu_routing_patch_has_a_target(source):
    """patch_cpu_router wraps one of these; without either it stays off (and says so)."""
    router = source.method(compat.CPU_ROUTER_MODULE, "CPURouter._compute_routing")
    select = source.method(compat.CPU_SELECT_EXPERTS_MODULE, "select_experts")
    assert router is not None or select is not None


def test_vllm_runs_the_config_hooks_before_picking_a_quantization(source):
    """config_hooks rely on ModelConfig.__post_init__ calling the per-architecture hook table
    before ``_verify_quantization`` (vLLM 0.27.1, 0.32.0, 0.33.0)."""
    post_init = source.source_of("vllm.config", "ModelConfig.__post_init__")
    hook = source.source_of("vllm.config", "ModelConfig._try_verify_and_update_model_config")
    assert post_init is not None and hook is not None
    assert post_init.index("_try_verify_and_update_model_config()") < post_init.index(
        "_verify_quantization()"
    )
    assert "MODELS_CONFIG_MAP" in hook and "verify_and_update_model_config" in hook


def test_attributes_the_package_uses_through_a_module(source):
    """Used as ``module.attribute`` (looked up at run time), so not in any import line."""
    assert source.definition("vllm.model_executor.layers.fused_moe", "FusedMoEFactory")
    assert source.method("vllm.model_executor.models.config", "VerifyAndUpdateConfig")
    assert source.definition("vllm.model_executor.models.config", "MODELS_CONFIG_MAP")


def test_what_cpu_lora_relies_on(source):
    """The model builds FusedMoE with ``lora_config`` hidden (FusedMoE reads it from the current
    vLLM config), hands vLLM's LoRA manager the routed-expert names through the model's
    ``get_expert_mapping``, and patch_cpu_lora_base_tokens wraps the CPU LoRA ops by name."""
    layer = source.module_file("vllm.model_executor.layers.fused_moe.layer")
    assert "is_lora_enabled=vllm_config.lora_config is not None" in source.read(layer)
    packed = source.source_of("vllm.lora.utils", "process_packed_modules_mapping")
    assert packed is not None and "get_moe_expert_mapping(model)" in packed
    from vllm_ernie_moe.patches import patch_cpu_lora_base_tokens as patch

    for name in patch.OPS:
        assert source.method(patch.OPS_MODULE, name), f"{patch.OPS_MODULE}.{name}"
    for importer in patch.IMPORTERS:
        assert all(source.definition(importer, name) for name in patch.OPS), importer


def test_mtp_layer_count_patch_has_a_target(source):
    from vllm_ernie_moe.patches import patch_ernie_mtp_layer_count as patch

    target = f"{patch.CONVERTOR}.get_num_hidden_layers"
    assert source.method(patch.CONVERTOR_MODULE, target), f"{patch.CONVERTOR_MODULE}.{target}"


def test_multinode_queues_patch_has_a_target(source):
    """The worker method it wraps, the queue function its probe runs, and the list it answers."""
    from vllm_ernie_moe.patches import patch_cpu_multinode_queues as patch

    assert source.method(patch.EXECUTOR_MODULE, "WorkerProc._init_message_queues")
    rule = source.source_of(
        patch.QUEUE_MODULE, "MessageQueue.create_from_process_group_single_reader"
    )
    assert rule is not None and "get_assigned_physical_gpu_ids()" in rule
    assert source.definition(patch.PLATFORM_MODULE, "get_assigned_physical_gpu_ids")


def test_aot_compile_cache_patch_has_a_target_with_the_bug(source):
    """The loader it wraps, still calling ``finalize_loading`` unguarded (the patch's probe)."""
    from vllm_ernie_moe.patches import patch_cpu_aot_compile_cache as patch

    loader = source.source_of(patch.DECORATORS_MODULE, patch.TARGET)
    assert loader is not None and "torch.compiler.load_compiled_function" in loader
    assert patch._finalizes_unguarded_source(loader)


def test_engine_core_worker_patch_has_targets_with_the_bug(source):
    """The platform rule it undoes (its probe), the process manager and socket threads it wraps,
    vLLM's binding."""
    from vllm_ernie_moe.patches import patch_cpu_engine_core_worker as patch

    rule = source.source_of(patch.PLATFORM_MODULE, "CpuPlatform.check_and_update_config")
    assert rule is not None and patch.forces_mp_for_one_worker_source(rule)
    init = source.source_of(patch.ENGINE_UTILS_MODULE, "CoreEngineProcManager.__init__")
    # The engine-core server's context replaces the module's get_mp_context during that call.
    assert init is not None and "get_mp_context()" in init
    assert source.definition(patch.ENGINE_UTILS_MODULE, "get_mp_context")
    assert source.method("vllm.utils.ompmultiprocessing", "OMPProcessManager.configure_omp_envs")
    for thread in patch.SOCKET_THREADS:
        assert source.method(patch.ENGINE_CORE_MODULE, f"EngineCoreProc.{thread}")


def test_onednn_handler_release_patch_has_a_target_with_the_bug(source):
    """The handler's ``__del__``, still reading its pointer with a tensor op (the patch's probe)."""
    from vllm_ernie_moe.patches import patch_cpu_onednn_handler_release as patch

    release = source.source_of(patch.CUSTOM_OPS_MODULE, patch.TARGET)
    assert release is not None and patch._releases_with_a_tensor_op_source(release)
