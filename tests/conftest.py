import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helper modules of the tests

from stub_device import device  # noqa: E402,F401  (the stubbed-device fixture of the host-side tests)


def _has_supported_gpu() -> bool:
    from flash_kda.jit.arch import arch_for_capability
    return torch.cuda.is_available() and arch_for_capability(*torch.cuda.get_device_capability(0)) is not None


def pytest_report_header(config):
    if not _has_supported_gpu():
        return "flash_kda: no supported GPU visible (GPU tests skipped)"
    from flash_kda.api import chunk_variant, device_arch
    arch = device_arch(0)
    return (f"flash_kda: {torch.cuda.get_device_name(0)}, target {arch}, chunked kernel variant "
            f"{chunk_variant(arch)} (FLASH_KDA_KERNEL={os.environ.get('FLASH_KDA_KERNEL', '')!r})")


def pytest_collection_modifyitems(config, items):
    if _has_supported_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU of a supported architecture (flash_kda/jit/arch.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def baked_cache(tmp_path_factory) -> Path:
    """Every specialisation for every target compiled once for the session by NVRTC, in parallel
    worker processes (the precompile path); tests that need real cubins or a complete cache share it."""
    import flash_kda
    directory = tmp_path_factory.mktemp("baked_cache")
    # with the spill check on: a specialisation that spills to local memory fails here
    previous = os.environ.get("FLASH_KDA_JIT_CHECK_SPILLS")
    os.environ["FLASH_KDA_JIT_CHECK_SPILLS"] = "1"
    try:
        entries = flash_kda.precompile(archs="all", cache_dir=directory, compiler="nvrtc")
    finally:
        if previous is None:
            del os.environ["FLASH_KDA_JIT_CHECK_SPILLS"]
        else:
            os.environ["FLASH_KDA_JIT_CHECK_SPILLS"] = previous
    assert entries and all(e.compiled for e in entries)
    return directory


@pytest.fixture(params=[(8, False), (4, False), (2, False), (4, True), (2, True)],
                ids=["8 CTAs a head", "4 CTAs a head", "2 CTAs a head", "4 CTAs a head, the last half 8",
                     "2 CTAs a head, the last half 4"])
def decode_ctas(request):
    """Runs a test's token-by-token launches with each choice of CTAs per (sequence, head): the
    one-group build (8), and the streamed (one-token steps) or token-outer (multi-token steps) build
    with 4 or 2 row groups per warp, whatever api._decode_ctas_per_head would pick for the test's
    small batches. The grouped builds run on the (CTAs a head, H, N) grid, and again with the last half
    of a launch's sequences (none of one) at twice the CTAs a head, as api._decode_halved_tail has
    launches of 1.5 waves or more end: 2 row groups a warp, or one."""
    from flash_kda import api
    ctas, halved = request.param
    with api._forced_decode_launch(ctas, halved_tail=halved):
        yield ctas
