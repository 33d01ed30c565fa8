"""The x86 kernel tier vLLM's CPU backend runs on, and one setting to force a lower tier.

vLLM's CPU wheel ships three x86 kernel libraries and loads one, chosen from torch's CPU probes
(``vllm/platforms/cpu.py``, ``import_kernels``): ``_C`` (AVX-512 with BF16; AMX paths where the CPU
has AMX), ``_C_AVX512`` (AVX-512 without BF16) and ``_C_AVX2``. PyTorch picks its own kernels from
``ATEN_CPU_CAPABILITY`` and oneDNN from ``ONEDNN_MAX_CPU_ISA``. ``VLLM_ERNIE_MOE_CPU_TIER=avx2`` (or
``avx512``) makes all three behave as that tier on a CPU that has more, so that every host can
test every tier it can execute.

torch and oneDNN read their variables once, at their first kernel, and vLLM's engine processes
load the kernel library before they load plugins: so the tier is set when a process starts. The
test suite's conftest does it for itself and every process it starts (``make test CPU_TIER=avx2``);
for any other command, ``python -m vllm_ernie_moe.cpu_tier avx2 vllm serve ...``. Child processes
run ``tier_startup/sitecustomize.py`` (on their PYTHONPATH), which replaces torch's probes first.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from vllm_ernie_moe import envs

#: The setting; unset or empty: the host's own tier.
TIER_VARIABLE = envs.CPU_TIER_VARIABLE


@dataclass(frozen=True)
class Tier:
    """One of vLLM's x86 kernel tiers: the library it loads, torch's and oneDNN's matching ISA
    names, what torch's probes answer on it, and the ``-march`` torch.compile's C++ builds for
    it (None: the host's own, ``native``)."""

    name: str
    library: str
    aten_capability: str
    onednn_isa: str
    avx512: bool
    avx512_bf16: bool
    vnni: bool
    march: str | None


#: Lowest first. AMX cannot be forced (a CPU without it cannot run it); ``avx512_bf16`` is the tier
#: of AVX-512 BF16/VNNI CPUs, with or without AMX. The ``-march`` matters: Inductor compiles its
#: kernels for the ISA torch's probes report but with ``-march=native`` by default, and that mix
#: of AVX2 vector code with the host's AVX-512 macros computed garbage in every other 8-lane block
#: of vLLM's compiled vocab-embedding mask at TP=2 (an IndexError in the engine).
TIERS = (
    Tier("avx2", "_C_AVX2", "avx2", "AVX2", False, False, False, "x86-64-v3"),
    Tier("avx512", "_C_AVX512", "avx512", "AVX512_CORE", True, False, False, "x86-64-v4"),
    Tier("avx512_bf16", "_C", "avx512", "ALL", True, True, True, None),
)
TIERS_BY_NAME = {tier.name: tier for tier in TIERS}
_FORCED_MARCHES = {tier.march for tier in TIERS if tier.march}
#: torch's CPU feature probes (``torch.cpu._is_<name>_supported``): a forced tier answers them.
TORCH_PROBES = ("avx2", "avx512", "avx512_bf16", "vnni", "amx_tile", "amx_fp16")


class CPUTierError(RuntimeError):
    """The requested tier is unknown, above the host's, or set too late in this process."""


def requested() -> Tier | None:
    """The tier named by ``VLLM_ERNIE_MOE_CPU_TIER``, or None when unset."""
    name = envs.cpu_tier_name()
    if not name:
        return None
    if name not in TIERS_BY_NAME:
        raise CPUTierError(
            f"{TIER_VARIABLE}={name!r} is not a tier: use one of {', '.join(TIERS_BY_NAME)} "
            "(or unset it for the host's own tier)."
        )
    return TIERS_BY_NAME[name]


#: Inductor's ``config.cpp.march``, read when ``torch._inductor.config`` is imported.
INDUCTOR_MARCH_VARIABLE = "TORCHINDUCTOR_CPP_MARCH"
#: Holds the ``sitecustomize`` that forces the tier at interpreter start.
STARTUP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tier_startup")


def environment(tier: Tier) -> dict[str, str]:
    """The variables a process must start with to run as ``tier``."""
    path = os.environ.get("PYTHONPATH", "")
    if STARTUP_DIR not in path.split(os.pathsep):
        path = os.pathsep.join(filter(None, (STARTUP_DIR, path)))
    variables = {
        TIER_VARIABLE: tier.name,
        "ATEN_CPU_CAPABILITY": tier.aten_capability,
        "ONEDNN_MAX_CPU_ISA": tier.onednn_isa,
        "PYTHONPATH": path,
    }
    if tier.march:
        variables[INDUCTOR_MARCH_VARIABLE] = tier.march
    return variables


def host_tier() -> Tier | None:
    """The highest tier this CPU can execute by its real probes (None: not x86 with AVX2)."""
    import torch

    probes = _real_probes(torch)
    if not probes["avx2"]():
        return None
    if probes["avx512_bf16"]() and probes["vnni"]():
        return TIERS_BY_NAME["avx512_bf16"]
    return TIERS_BY_NAME["avx512"] if probes["avx512"]() else TIERS_BY_NAME["avx2"]


def active() -> Tier | None:
    """The tier this process runs as: the forced one, else the host's."""
    return requested() or host_tier()


def set_environment() -> Tier | None:
    """Put the requested tier's variables into ``os.environ`` (for this process, if torch has not
    run a kernel yet, and for every process it starts). Call before importing torch."""
    tier = requested()
    if tier is not None:
        os.environ.update(environment(tier))
        if tier.march is None and os.environ.get(INDUCTOR_MARCH_VARIABLE) in _FORCED_MARCHES:
            del os.environ[INDUCTOR_MARCH_VARIABLE]  # a lower tier's, inherited: back to native
    return tier


def force() -> Tier | None:
    """Make this process behave as the requested tier: torch's probes answer as that tier, so
    vLLM loads that tier's library and picks that tier's kernels. Idempotent; a no-op when no
    tier is requested. Raises :class:`CPUTierError` when the tier is above the host's or torch
    already runs another ISA (the variable was set after the process started)."""
    tier = set_environment()
    if tier is None:
        return None
    import torch

    host = host_tier()
    if host is None or TIERS.index(tier) > TIERS.index(host):
        raise CPUTierError(
            f"{TIER_VARIABLE}={tier.name}: this CPU cannot execute that tier (its own is "
            f"{host.name if host else 'below AVX2'}). Unset it or name a lower tier."
        )
    running = torch.backends.cpu.get_cpu_capability().lower()
    if running not in (tier.aten_capability, "default"):
        raise CPUTierError(
            f"{TIER_VARIABLE}={tier.name} was set after torch chose its kernels ({running}): "
            "set it in the environment before the process starts."
        )
    if "vllm._custom_ops" in sys.modules and loaded_library() not in (None, tier.library):
        raise CPUTierError(
            f"{TIER_VARIABLE}={tier.name}: vLLM already loaded {loaded_library()}; set it in the "
            "environment before the process starts."
        )
    real = _real_probes(torch)
    answers = {
        "avx512": tier.avx512,
        "avx512_bf16": tier.avx512_bf16,
        "vnni": tier.vnni,
        "amx_tile": False,  # AMX is never forced on; a lower tier has none
        "amx_fp16": False,
    }
    for name, answer in answers.items():
        # Never claim more than the CPU has.
        setattr(torch.cpu, f"_is_{name}_supported", _probe(answer and real[name](), real[name]))
    if tier.march and "torch._inductor.config" in sys.modules:  # imported before the variable
        sys.modules["torch._inductor.config"].cpp.march = tier.march
    return tier


def loaded_library() -> str | None:
    """Which of vLLM's x86 kernel libraries this process has loaded (from its memory map)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            mapped = maps.read()
    except OSError:
        return None
    for tier in reversed(TIERS):  # "_C" is a prefix of the others: test it last
        if f"/vllm/{tier.library}.abi3.so" in mapped:
            return tier.library
    return None


def _real_probes(torch) -> dict:
    """torch's own probes, kept aside the first time they are replaced."""
    saved = getattr(torch.cpu, "_vllm_ernie_moe_real_probes", None)
    if saved is None:
        saved = {name: getattr(torch.cpu, f"_is_{name}_supported") for name in TORCH_PROBES}
        torch.cpu._vllm_ernie_moe_real_probes = saved
    return saved


def _probe(answer: bool, real):
    def probe() -> bool:
        return answer

    probe.__wrapped__ = real  # type: ignore[attr-defined]
    return probe


def main(argv: list[str] | None = None) -> None:
    """``python -m vllm_ernie_moe.cpu_tier TIER COMMAND...``: run COMMAND as that tier."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        names = ",".join(TIERS_BY_NAME)
        sys.exit(f"usage: python -m vllm_ernie_moe.cpu_tier {{{names}}} COMMAND...")
    os.environ[TIER_VARIABLE] = args[0]
    try:
        set_environment()  # a tier above the host's is refused by the command's sitecustomize
    except CPUTierError as error:
        sys.exit(str(error))
    os.execvp(args[1], args[1:])


if __name__ == "__main__":
    main()
