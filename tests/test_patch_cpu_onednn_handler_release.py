"""patch_cpu_onednn_handler_release: a oneDNN handler collected inside a torch mode is released,
with the pointer vLLM stored, and the thread's dispatch state is left as it was."""

import contextlib
import gc
import subprocess
import sys

import pytest
import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._prims.context import TorchRefsMode
from torch._subclasses.fake_tensor import FakeTensorMode
from vllm import _custom_ops as ops

from vllm_ernie_moe.patches import patch_cpu_onednn_handler_release as patch
from vllm_ernie_moe.patches.patching import is_patched, unpatched

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops._C, "create_onednn_mm_handler"), reason="vLLM built without oneDNN"
)


def handler_with_a_release_spy(released: list[int]) -> tuple[ops.CPUDNNLGEMMHandler, int]:
    """A handler whose release records the pointer it gets (and releases it), and the pointer
    read outside any mode."""
    handler = ops.create_onednn_mm(torch.randn(32, 64), 128)
    release = handler.dtor
    handler.dtor = lambda pointer: (released.append(pointer), release(pointer))
    return handler, handler.handler_tensor.item()


def test_unpatched_release_fails_under_a_fake_tensor_mode():
    """The bug the patch exists for; when this fails, vLLM's release changed: re-check it."""
    released: list[int] = []
    handler, pointer = handler_with_a_release_spy(released)
    with FakeTensorMode(), pytest.raises(AssertionError, match="FakeTensor"):
        unpatched(ops.CPUDNNLGEMMHandler.__del__)(handler)
    assert released == []
    del handler  # its last reference: released now
    assert released == [pointer]


def including(key: str):
    return lambda: torch._C._IncludeDispatchKeyGuard(getattr(torch._C.DispatchKey, key))


@pytest.mark.parametrize(
    "modes",
    [
        (FakeTensorMode,),
        (FakeTensorMode, TorchRefsMode),
        (TorchRefsMode, FakeTensorMode),
        (including("Meta"),),
        (enable_python_dispatcher, including("Meta"), including("Functionalize")),
    ],
    ids=["fake", "fake+refs", "refs+fake", "meta", "meta+functionalize+python-dispatcher"],
)
def test_handler_collected_inside_torch_modes_is_released(modes, monkeypatch):
    """Each case fails unpatched: an AssertionError under a FakeTensorMode, "cannot be called on
    meta tensors" with Meta included, a RecursionError with the Python dispatcher on as well (the
    state the collector interrupted in the 0.27.1 suite: docs/results/dispatch-key-leak-0.27.1-
    zen4.txt); nothing released. A TorchRefsMode alone does not fail."""
    assert patch.apply() is True
    unraisable: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda hook: unraisable.append(hook.exc_value))
    released: list[int] = []
    keys_before = (
        torch._C._dispatch_tls_local_include_set(),
        torch._C._dispatch_tls_local_exclude_set(),
    )
    gc.disable()  # no automatic collection frees the handler before the modes are entered
    try:
        handler, pointer = handler_with_a_release_spy(released)
        cycle: list = [handler]
        cycle.append(cycle)  # only the collector frees it, inside the modes
        del handler, cycle
        assert released == []
        with contextlib.ExitStack() as active:
            for mode in modes:
                active.enter_context(mode())
            gc.collect()
    finally:
        gc.enable()
    assert unraisable == []
    assert released == [pointer]
    assert (
        torch._C._dispatch_tls_local_include_set(),
        torch._C._dispatch_tls_local_exclude_set(),
    ) == keys_before


def test_the_plugins_load_patches_it():
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm._custom_ops import CPUDNNLGEMMHandler\n"
        "from vllm_ernie_moe.patches.patching import is_patched\n"
        "print('patched', is_patched(CPUDNNLGEMMHandler.__del__))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "patched True"


def test_apply_is_idempotent():
    assert patch.apply() is True
    patched = ops.CPUDNNLGEMMHandler.__del__
    assert is_patched(patched)
    assert patch._releases_with_a_tensor_op(unpatched(patched))
    assert patch.apply() is True
    assert ops.CPUDNNLGEMMHandler.__del__ is patched
