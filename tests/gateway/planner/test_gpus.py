import pytest

from gateway.errors import UserError
from gateway.planner import BUILTIN_GPUS, GpuSpec, find_gpu, gpu_catalog


def test_catalog_has_the_required_types():
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "l40s", "rtx-4090"} <= set(BUILTIN_GPUS)


def test_datasheet_figures():
    h100 = find_gpu("H100-80GB")
    assert (h100.bf16_tflops, h100.hbm_gb_per_s, h100.interconnect, h100.interconnect_gb_per_s) == (
        989, 3350, "nvlink", 900)
    assert find_gpu("l40s").interconnect == "pcie"


@pytest.mark.parametrize(("gpu", "batch"), [("a100-80gb", 384), ("h100-80gb", 1024), ("h200-141gb", 1024),
                                            ("l40s", 128)])
def test_lmdeploy_default_max_batch_size(gpu, batch):
    assert find_gpu(gpu).default_max_batch_size == batch


def test_user_types_extend_and_override_the_catalog():
    mine = GpuSpec("h100-80gb", 80000, 900, 3000, "nvlink", 450)
    catalog = gpu_catalog({"h100-80gb": mine, "mi300x": GpuSpec("mi300x", 196608, 1307, 5300, "pcie", 64)})
    assert catalog["h100-80gb"].bf16_tflops == 900
    assert find_gpu("mi300x", catalog).memory_bytes == 196608 * 1024**2


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown GPU 'v100'.*a100-40gb"):
        find_gpu("v100")


def test_bad_interconnect():
    with pytest.raises(UserError, match="interconnect must be 'nvlink' or 'pcie'"):
        GpuSpec("x", 1, 1, 1, "infiniband", 1)
