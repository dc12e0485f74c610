"""The device environment the tests run under (imported by conftest.py and the tests that check it)."""


def default_ds_accelerator(environ, cuda_available) -> str | None:
    """The ``DS_ACCELERATOR`` the tests run under: an explicit value is kept; unset, "cpu" only where no
    CUDA device is visible (``cuda_available``: a callable, asked only then). On a GPU machine it stays
    unset, so DeepSpeed picks CUDA (scripts/gpu_checks.sh unsets it; a forced "cpu" would build the
    engine on the CPU accelerator beside an NCCL process group). ``None`` = leave it unset."""
    if "DS_ACCELERATOR" in environ:
        return environ["DS_ACCELERATOR"]
    return None if cuda_available() else "cpu"
